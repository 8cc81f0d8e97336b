"""Input checks shared by the functions and modules of dan-layers.

Every check raises ``ValueError`` with a message of the form
``"<what>: expected <...>, got <...>"``. Checks on shapes, dtypes and devices
read only static metadata and are free under ``torch.compile(fullgraph=True)``.
The one data-dependent check (labels in range) reads tensor values: in eager
mode it raises ``ValueError`` naming the offending label; while being compiled
it becomes a device-side assertion (``torch._assert_async``), which keeps the
graph whole and fails with ``RuntimeError`` instead.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__: list[str] = []  # private module

REDUCTIONS = ("mean", "sum", "none")
PARTITION_VARIANTS = ("paper", "official")


def is_compiling() -> bool:
    """Whether the caller is being traced by ``torch.compile`` / ``torch.export``."""
    return torch.compiler.is_compiling()


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_ndim(x: torch.Tensor, name: str, ndims: Sequence[int], layout: str) -> None:
    """Raise if ``x.ndim`` is not in ``ndims``; ``layout`` describes the expected shape."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.ndim not in ndims:
        raise ValueError(f"{name}: expected a tensor of shape {layout}, got shape {tuple(x.shape)}")


def check_floating(x: torch.Tensor, name: str) -> None:
    """Raise if ``x`` is not a floating-point tensor."""
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def check_size(x: torch.Tensor, dim: int, expected: int, name: str, what: str) -> None:
    """Raise if ``x.shape[dim] != expected``."""
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected {what} = {expected} (size of dim {dim}), "
            f"got {x.shape[dim]} in shape {tuple(x.shape)}"
        )


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise if the given tensors are not all tensors on one device."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")


def check_labels(labels: torch.Tensor, batch: int, num_classes: int) -> None:
    """Check integer labels of shape ``(batch,)`` with values in ``[0, num_classes)``."""
    check_ndim(labels, "labels", (1,), "(B,)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor, got dtype {labels.dtype}")
    if labels.shape[0] != batch:
        raise ValueError(
            f"labels: expected one label per sample, {batch} for a batch of {batch} features, "
            f"got {labels.shape[0]}"
        )
    in_range = (labels >= 0) & (labels < num_classes)
    if is_compiling():
        torch._assert_async(in_range.all(), "labels: expected values in [0, num_classes)")
        return
    if labels.numel() > 0 and not bool(in_range.all()):
        bad = labels[~in_range][0].item()
        raise ValueError(f"labels: expected values in [0, {num_classes}), got label {bad}")


def check_batchnorm_batch(batch: int, training: bool, where: str, per_channel: int = 1) -> None:
    """Raise the trap of BatchNorm in train mode: one value per channel has no variance."""
    if training and batch * per_channel <= 1:
        raise ValueError(
            f"{where}: a BatchNorm layer in train mode needs more than one value per channel, "
            f"expected a batch of at least 2, got {batch}; call .eval() for single samples"
        )


def check_positive(name: str, value: int) -> None:
    """Raise if an integer hyperparameter is not positive."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def has_training_batchnorm(module: nn.Module) -> bool:
    """Whether a BatchNorm inside ``module`` normalises with batch statistics (train mode)."""
    return any(
        isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats) for m in module.modules()
    )


def check_feature_map(
    x: torch.Tensor, in_channels: int, weight: torch.Tensor, batchnorm_training: bool
) -> None:
    """Check a spatial unit's input ``(B, in_channels, H, W)``, on the device of ``weight``.

    With ``batchnorm_training``, also more than one value per channel for its BatchNorms.
    """
    check_ndim(x, "x", (4,), "(B, C, H, W)")
    check_size(x, 1, in_channels, "x", "in_channels")
    check_same_device(x=x, weights=weight)
    if batchnorm_training:
        check_batchnorm_batch(x.shape[0], True, "SpatialAttention", x.shape[2] * x.shape[3])


def check_pooled_input(x: torch.Tensor, num_heads: int, in_channels: int, weight: torch.Tensor) -> None:
    """Check a channel unit's input, on the device of ``weight``.

    ``(B, C)``, ``(B, 1, C)`` or ``(B, C, H, W)`` for one head, ``(B, K, C)`` for any number.
    """
    if num_heads == 1:
        check_ndim(x, "x", (2, 3, 4), "(B, C), (B, 1, C) or (B, C, H, W)")
    else:
        check_ndim(x, "x", (3,), f"(B, K={num_heads}, C)")
    if x.ndim == 3:
        check_size(x, 1, num_heads, "x", "num_heads")
    check_size(x, x.ndim - 1 if x.ndim == 3 else 1, in_channels, "x", "in_channels")
    check_same_device(x=x, weights=weight)


def reduced_width(in_channels: int, reduction: int, name: str) -> int:
    """``in_channels // reduction``, checked: both positive ints and the result at least 1."""
    check_positive("in_channels", in_channels)
    check_positive(name, reduction)
    width = in_channels // reduction
    if width < 1:
        raise ValueError(
            f"{name}: expected at most in_channels ({in_channels}) so that the reduced width "
            f"is at least 1, got {reduction}"
        )
    return width


_KERNEL_SIZES_EXPECTED = "a sequence of (height, width) pairs of odd positive ints, e.g. ((3, 3), (1, 3))"


def _as_int(value: object) -> int:
    """``value`` as an int if it is an integer (not a bool, not a float); else ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError
    try:
        return operator.index(cast(Any, value))
    except TypeError:
        raise ValueError from None


def check_kernel_sizes(kernel_sizes: object) -> tuple[tuple[int, int], ...]:
    """``kernel_sizes`` as a tuple of ``(kh, kw)`` int pairs, odd, positive and distinct."""
    if isinstance(kernel_sizes, (str, bytes)) or not isinstance(kernel_sizes, Iterable):
        raise ValueError(f"kernel_sizes: expected {_KERNEL_SIZES_EXPECTED}, got {kernel_sizes!r}")
    given = tuple(kernel_sizes)
    sizes = []
    for size in given:
        pair = () if isinstance(size, (str, bytes)) or not isinstance(size, Iterable) else tuple(size)
        if len(pair) != 2:
            raise ValueError(
                f"kernel_sizes: expected {_KERNEL_SIZES_EXPECTED}, got {given!r} "
                f"(element {size!r} is not a (height, width) pair)"
            )
        try:
            sizes.append((_as_int(pair[0]), _as_int(pair[1])))
        except ValueError:
            raise ValueError(f"kernel_sizes: expected integer sizes, got {pair!r} in {given!r}") from None
    result = tuple(sizes)
    if not result:
        raise ValueError("kernel_sizes: expected at least one kernel size, got none")
    if any(k < 1 or k % 2 == 0 for size in result for k in size):
        raise ValueError(f"kernel_sizes: expected odd positive sizes, got {result}")
    if len(set(result)) != len(result):
        raise ValueError(f"kernel_sizes: expected distinct sizes, got {result}")
    return result
