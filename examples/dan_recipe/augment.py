"""Random augmentations on float image tensors, per image of a batch (torch only).

Every transform takes a float tensor ``(C, H, W)`` or a batch ``(B, C, H, W)`` and
returns one of the same kind, drawing independent parameters for every image of a
batch. Each takes an optional ``torch.Generator``; see :mod:`dan_recipe.transforms`
for when to pass one. The presets that combine them are
:func:`dan_recipe.transforms.build_transforms`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._transform_checks import Random, Transform, as_batch, check_p, float_check, pair, value_range

__all__ = [
    "RandomAffine",
    "RandomApply",
    "RandomCrop",
    "RandomErasing",
    "RandomHorizontalFlip",
    "RandomRotation",
]


class RandomHorizontalFlip(Random):
    """Mirror left-right with probability ``p`` (per image).

    Args:
        p: Probability of flipping.
        generator: Optional source of randomness.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = check_p(p, "RandomHorizontalFlip p")
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = as_batch(x, "RandomHorizontalFlip")
        flip = (self._uniform(xb.shape[0], 0.0, 1.0) < self.p).to(xb.device)
        out = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomApply(Random):
    """Apply a list of transforms, all or none, with probability ``p`` (per image).

    Args:
        transforms: A transform or a sequence of transforms applied in order.
        p: Probability of applying them.
        generator: Optional source of randomness for the coin (the inner
            transforms keep their own).
    """

    def __init__(
        self,
        transforms: Transform | Sequence[Transform],
        p: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        self.transforms = list(transforms) if isinstance(transforms, Sequence) else [transforms]
        self.p = check_p(p, "RandomApply p")
        self.generator = generator

    def _inner(self, x: Tensor) -> Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = as_batch(x, "RandomApply")
        apply = self._uniform(xb.shape[0], 0.0, 1.0) < self.p
        if not bool(apply.any()):
            return x
        if bool(apply.all()):
            out = self._inner(xb)
        else:
            idx = apply.nonzero().flatten().to(xb.device)
            out = xb.clone()
            out[idx] = self._inner(xb[idx])
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"RandomApply(p={self.p}, transforms={self.transforms!r})"


def _affine_sample(xb: Tensor, mats: Tensor, fill: float) -> Tensor:
    """Warp by pixel-space matrices ``mats (B, 2, 3)`` mapping output to input pixels.

    Pixel coordinates are centred on the image centre. Outside pixels take ``fill``.
    """
    b, c, h, w = xb.shape
    # normalised (align_corners=False) coordinates: u = x / (w / 2), v = y / (h / 2)
    d = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
    theta = mats.clone()
    theta[:, :, :2] = mats[:, :, :2] * d.view(1, 1, 2) / d.view(1, 2, 1)
    theta[:, :, 2] = mats[:, :, 2] / d.view(1, 2)
    grid = F.affine_grid(theta.to(xb.dtype).to(xb.device), [b, c, h, w], align_corners=False)
    if fill == 0.0:
        return F.grid_sample(xb, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ones = torch.ones(b, 1, h, w, dtype=xb.dtype, device=xb.device)
    out = F.grid_sample(
        torch.cat([xb, ones], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    img, mask = out[:, :c], out[:, c:]
    return img + (1.0 - mask) * fill


def _inverse_matrices(angle_deg: Tensor, scale: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """Output->input pixel maps of ``rotate(angle) * scale`` followed by a shift ``(tx, ty)``.

    Pixel coordinates have x to the right and y downwards; a positive angle turns
    the picture counter-clockwise as seen on screen (torchvision's convention).
    """
    a = angle_deg * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    # forward (y down, counter-clockwise on screen): p_out = s Q p_in + t with
    # Q = [[cos, sin], [-sin, cos]]  =>  p_in = Q^T (p_out - t) / s
    inv = torch.zeros(angle_deg.shape[0], 2, 3, dtype=torch.float64)
    inv[:, 0, 0], inv[:, 0, 1] = cos / scale, -sin / scale
    inv[:, 1, 0], inv[:, 1, 1] = sin / scale, cos / scale
    inv[:, 0, 2] = -(inv[:, 0, 0] * tx + inv[:, 0, 1] * ty)
    inv[:, 1, 2] = -(inv[:, 1, 0] * tx + inv[:, 1, 1] * ty)
    return inv


class RandomAffine(Random):
    """Random rotation, translation and scale about the image centre (bilinear).

    A positive angle turns the picture counter-clockwise, as in torchvision.

    Args:
        degrees: Rotation range: ``d`` means ``[-d, d]``, or ``(low, high)``.
        translate: Maximal shift as fractions ``(fx, fy)`` of width and height,
            drawn uniformly in ``[-fx * W, fx * W]`` etc.; ``None`` for none.
        scale: Scale range ``(low, high)``; ``None`` keeps the size.
        fill: Value of pixels that come from outside the input.
        generator: Optional source of randomness.
    """

    def __init__(
        self,
        degrees: float | Sequence[float],
        translate: Sequence[float] | None = None,
        scale: Sequence[float] | None = None,
        fill: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.degrees = value_range(degrees, "RandomAffine degrees", symmetric=True)
        if translate is not None:
            if len(translate) != 2 or not all(0.0 <= float(t) <= 1.0 for t in translate):
                raise ValueError(f"RandomAffine translate: expected two fractions in [0, 1], got {translate!r}")
            translate = (float(translate[0]), float(translate[1]))
        self.translate = translate
        if scale is not None:
            scale = value_range(scale, "RandomAffine scale", symmetric=False)
            if scale[0] <= 0:
                raise ValueError(f"RandomAffine scale: expected positive values, got {scale!r}")
        self.scale = scale
        self.fill = float(fill)
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = as_batch(x, type(self).__name__)
        float_check(xb, type(self).__name__)
        b, _, h, w = xb.shape
        angle = self._uniform(b, *self.degrees)
        if self.translate is not None:
            tx = self._uniform(b, -self.translate[0] * w, self.translate[0] * w)
            ty = self._uniform(b, -self.translate[1] * h, self.translate[1] * h)
        else:
            tx = ty = torch.zeros(b, dtype=torch.float64)
        s = self._uniform(b, *self.scale) if self.scale is not None else torch.ones(b, dtype=torch.float64)
        out = _affine_sample(xb, _inverse_matrices(angle, s, tx, ty), self.fill)
        return out[0] if single else out

    def __repr__(self) -> str:
        return (
            f"RandomAffine(degrees={self.degrees}, translate={self.translate}, "
            f"scale={self.scale}, fill={self.fill})"
        )


class RandomRotation(RandomAffine):
    """Random rotation about the image centre, the image size kept (corners get ``fill``).

    Args:
        degrees: ``d`` for ``[-d, d]`` or ``(low, high)``.
        fill: Value of pixels that come from outside the input.
        generator: Optional source of randomness.
    """

    def __init__(
        self, degrees: float | Sequence[float], fill: float = 0.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(degrees, fill=fill, generator=generator)

    def __repr__(self) -> str:
        return f"RandomRotation(degrees={self.degrees}, fill={self.fill})"


class RandomCrop(Random):
    """Pad every side by ``padding`` pixels (with ``fill``), then crop ``size`` at random.

    Args:
        size: Output ``int`` (square) or ``(height, width)``.
        padding: Pixels added on every side before cropping.
        fill: Padding value.
        generator: Optional source of randomness.

    Raises:
        ValueError: At call time, if the padded image is smaller than ``size``.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        padding: int = 0,
        fill: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = pair(size, "RandomCrop size")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"RandomCrop padding: expected a non-negative int, got {padding!r}")
        self.padding = padding
        self.fill = float(fill)
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = as_batch(x, "RandomCrop")
        if self.padding:
            xb = F.pad(xb, [self.padding] * 4, value=self.fill)
        b, _, h, w = xb.shape
        th, tw = self.size
        if h < th or w < tw:
            raise ValueError(f"RandomCrop: expected a (padded) image of at least {self.size}, got {(h, w)}")
        top = torch.randint(0, h - th + 1, (b,), generator=self.generator).tolist()
        left = torch.randint(0, w - tw + 1, (b,), generator=self.generator).tolist()
        out = torch.stack(
            [xb[i, :, t : t + th, c : c + tw] for i, (t, c) in enumerate(zip(top, left, strict=True))]
        )
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding}, fill={self.fill})"


class RandomErasing(Random):
    """Erase a random rectangle with probability ``p`` (Zhong et al. 2020), per image.

    The rectangle's area is a uniform fraction ``scale`` of the image and its
    aspect ratio log-uniform in ``ratio``; up to 10 draws are tried until one fits,
    otherwise the image is left as is. Apply it after :class:`Normalize` (as the
    authors do) so that ``value=0`` is the dataset mean.

    Args:
        p: Probability of erasing.
        scale: Range of the erased area as a fraction of the image.
        ratio: Range of the aspect ratio (height / width).
        value: Value written into the rectangle.
        generator: Optional source of randomness.
    """

    def __init__(
        self,
        p: float = 0.5,
        scale: Sequence[float] = (0.02, 0.33),
        ratio: Sequence[float] = (0.3, 3.3),
        value: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.p = check_p(p, "RandomErasing p")
        self.scale = value_range(scale, "RandomErasing scale", symmetric=False)
        if not 0.0 < self.scale[1] <= 1.0 or self.scale[0] < 0.0:
            raise ValueError(f"RandomErasing scale: expected fractions in (0, 1], got {scale!r}")
        self.ratio = value_range(ratio, "RandomErasing ratio", symmetric=False)
        if self.ratio[0] <= 0:
            raise ValueError(f"RandomErasing ratio: expected positive values, got {ratio!r}")
        self.value = float(value)
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = as_batch(x, "RandomErasing")
        b, _, h, w = xb.shape
        erase = (self._uniform(b, 0.0, 1.0) < self.p).tolist()
        out = None
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for i in range(b):
            if not erase[i]:
                continue
            areas = self._uniform(10, *self.scale) * (h * w)
            ratios = torch.exp(self._uniform(10, log_lo, log_hi))
            pos = self._uniform(20, 0.0, 1.0)
            for k in range(10):
                eh = int(round(math.sqrt(float(areas[k] * ratios[k]))))
                ew = int(round(math.sqrt(float(areas[k] / ratios[k]))))
                if 0 < eh < h and 0 < ew < w:
                    top = int(float(pos[2 * k]) * (h - eh + 1))
                    left = int(float(pos[2 * k + 1]) * (w - ew + 1))
                    if out is None:
                        out = xb.clone()
                    out[i, :, top : top + eh, left : left + ew] = self.value
                    break
        if out is None:
            return x
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.p}, scale={self.scale}, ratio={self.ratio}, value={self.value})"
