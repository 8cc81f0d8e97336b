"""Argument and shape checks shared by :mod:`dan_recipe.transforms` and :mod:`dan_recipe.augment`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__: list[str] = []

#: A callable from image tensor to image tensor.
Transform = Callable[[Tensor], Tensor]


def as_batch(x: Tensor, name: str) -> tuple[Tensor, bool]:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__} (use ToTensor first)")
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() == 4:
        return x, False
    raise ValueError(f"{name}: expected a (C, H, W) or (B, C, H, W) tensor, got shape {tuple(x.shape)}")


def float_check(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got {x.dtype} (use ToTensor first)")


def pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        out = (v, v)
    elif isinstance(v, Sequence) and len(v) == 2 and all(isinstance(i, int) for i in v):
        out = (int(v[0]), int(v[1]))
    else:
        raise ValueError(f"{name}: expected an int or a pair (height, width), got {v!r}")
    if min(out) < 1:
        raise ValueError(f"{name}: expected positive sizes, got {v!r}")
    return out


def value_range(v: float | Sequence[float], name: str, *, symmetric: bool) -> tuple[float, float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if symmetric:
            if v < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {v}")
            return (-float(v), float(v))
        return (float(v), float(v))
    if isinstance(v, Sequence) and len(v) == 2:
        lo, hi = float(v[0]), float(v[1])
        if lo > hi:
            raise ValueError(f"{name}: expected (low, high) with low <= high, got {v!r}")
        return (lo, hi)
    raise ValueError(f"{name}: expected a number or a pair (low, high), got {v!r}")


def check_p(p: float, name: str) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
    return float(p)


class Random:
    """Mixin: uniform draws from an optional generator."""

    generator: torch.Generator | None

    def _uniform(self, n: int, lo: float, hi: float) -> Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64) * (hi - lo) + lo
