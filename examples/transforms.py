"""Image transforms on float tensors, written with torch only (no torchvision).

Every transform takes a float tensor ``(C, H, W)`` or a batch ``(B, C, H, W)`` and
returns one of the same kind; random transforms draw independent parameters for
every image of a batch. :class:`ToTensor` is the entry point from PIL images and
numpy / torch ``uint8`` arrays.

Randomness: every random transform takes an optional ``torch.Generator``. With
``generator=None`` (the default) it uses torch's global generator, which a
``DataLoader`` seeds differently in every worker, so that is the right choice for
multi-worker loading (a generator object handed to a transform is copied into
each worker, and all workers would then draw the same numbers). Pass a generator
for a reproducible single-process pipeline or in tests.

Presets (:func:`build_transforms`), sizes in pixels of the output image:

* ``"rafdb"`` (the authors' RAF-DB recipe): resize, horizontal flip, with
  probability 0.2 [rotation up to 20 degrees, then a random crop after zero
  padding of 32 px at 224 (scaled with the image size)], ImageNet normalisation,
  random erasing (p 0.5, scale 0.02-0.25).
* ``"affectnet"`` (the authors' AffectNet recipe): resize, horizontal flip, with
  probability 0.7 a random affine (20 degrees, translate 0.2, scale 0.8-1),
  normalisation, random erasing (p 0.5, scale 0.02-0.33, the default the authors
  kept for AffectNet).
* ``"demo"`` (light, for small synthetic runs): resize, flip, with probability 0.5
  a small affine (10 degrees, translate 0.05, scale 0.9-1.05), normalisation.
* evaluation (``train=False``), any preset: resize and normalisation.

Example:
    >>> import torch, transforms as T
    >>> tf = T.build_transforms("rafdb", 64, train=True, generator=torch.Generator().manual_seed(0))
    >>> tf(torch.rand(3, 100, 100)).shape
    torch.Size([3, 64, 64])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "Compose",
    "Normalize",
    "RandomAffine",
    "RandomApply",
    "RandomCrop",
    "RandomErasing",
    "RandomHorizontalFlip",
    "RandomRotation",
    "Resize",
    "ToTensor",
    "build_transforms",
]

#: ImageNet channel means (RGB), as the authors normalise.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: ImageNet channel standard deviations (RGB).
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Names accepted by :func:`build_transforms`.
PRESETS: tuple[str, ...] = ("rafdb", "affectnet", "demo")

Transform = Callable[[Tensor], Tensor]


def _as_batch(x: Tensor, name: str) -> tuple[Tensor, bool]:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__} (use ToTensor first)")
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() == 4:
        return x, False
    raise ValueError(f"{name}: expected a (C, H, W) or (B, C, H, W) tensor, got shape {tuple(x.shape)}")


def _float_check(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got {x.dtype} (use ToTensor first)")


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        out = (v, v)
    elif isinstance(v, Sequence) and len(v) == 2 and all(isinstance(i, int) for i in v):
        out = (int(v[0]), int(v[1]))
    else:
        raise ValueError(f"{name}: expected an int or a pair (height, width), got {v!r}")
    if min(out) < 1:
        raise ValueError(f"{name}: expected positive sizes, got {v!r}")
    return out


def _range(v: float | Sequence[float], name: str, *, symmetric: bool) -> tuple[float, float]:
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


def _check_p(p: float, name: str) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
    return float(p)


class _Random:
    """Mixin: uniform draws from an optional generator."""

    generator: torch.Generator | None

    def _uniform(self, n: int, lo: float, hi: float) -> Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64) * (hi - lo) + lo


class Compose:
    """Apply transforms one after the other.

    Args:
        transforms: Callables, each taking and returning a tensor.
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class ToTensor:
    """PIL image or ``uint8`` array/tensor -> float tensor ``(C, H, W)`` in ``[0, 1]``.

    Accepts a PIL image (converted to RGB unless it is L), a numpy array ``(H, W)``
    or ``(H, W, C)`` (``uint8`` is divided by 255, floats are kept), a ``uint8``
    torch tensor ``(C, H, W)``, or a float tensor, which passes unchanged.
    """

    def __call__(self, pic: Any) -> Tensor:
        if isinstance(pic, Tensor):
            if pic.is_floating_point():
                return pic
            if pic.dtype == torch.uint8:
                return pic.float().div_(255.0)
            raise ValueError(f"ToTensor: expected a uint8 or float tensor, got {pic.dtype}")
        if not isinstance(pic, np.ndarray):
            try:
                from PIL import Image
            except ImportError as e:  # pragma: no cover - pillow is an examples dependency
                raise TypeError(f"ToTensor: expected a PIL image or an array, got {type(pic).__name__}") from e
            if not isinstance(pic, Image.Image):
                raise TypeError(f"ToTensor: expected a PIL image or an array, got {type(pic).__name__}")
            if pic.mode not in ("RGB", "L"):
                pic = pic.convert("RGB")
            pic = np.asarray(pic)
        arr = pic
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3:
            raise ValueError(f"ToTensor: expected an (H, W) or (H, W, C) array, got shape {arr.shape}")
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, copy=True, order="C")
        t = torch.from_numpy(arr).permute(2, 0, 1)
        if t.dtype == torch.uint8:
            return t.float().div_(255.0)
        if t.is_floating_point():
            return t.float()
        raise ValueError(f"ToTensor: expected a uint8 or float array, got {arr.dtype}")

    def __repr__(self) -> str:
        return "ToTensor()"


class Resize:
    """Resize to ``size`` with bilinear interpolation and antialiasing.

    Args:
        size: ``int`` for a square ``size x size`` output (face crops are square;
            unlike torchvision, an int does not mean "shorter edge"), or
            ``(height, width)``.
        antialias: Low-pass filter when shrinking (as PIL does).
    """

    def __init__(self, size: int | Sequence[int], antialias: bool = True) -> None:
        self.size = _pair(size, "Resize size")
        self.antialias = antialias

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = _as_batch(x, "Resize")
        _float_check(xb, "Resize")
        if tuple(xb.shape[-2:]) != self.size:
            xb = F.interpolate(
                xb, size=self.size, mode="bilinear", align_corners=False, antialias=self.antialias
            )
        return xb[0] if single else xb

    def __repr__(self) -> str:
        return f"Resize(size={self.size}, antialias={self.antialias})"


class Normalize:
    """``(x - mean) / std`` per channel.

    Args:
        mean: Channel means.
        std: Channel standard deviations (positive).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != len(std):
            raise ValueError(
                f"Normalize: expected mean and std of equal length, got {len(mean)} and {len(std)}"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: expected positive std, got {tuple(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = _as_batch(x, "Normalize")
        _float_check(xb, "Normalize")
        if xb.shape[1] != len(self.mean):
            raise ValueError(f"Normalize: expected {len(self.mean)} channels, got {xb.shape[1]}")
        mean = torch.tensor(self.mean, dtype=xb.dtype, device=xb.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=xb.dtype, device=xb.device).view(1, -1, 1, 1)
        out = (xb - mean) / std
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class RandomHorizontalFlip(_Random):
    """Mirror left-right with probability ``p`` (per image).

    Args:
        p: Probability of flipping.
        generator: Optional source of randomness.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = _check_p(p, "RandomHorizontalFlip p")
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = _as_batch(x, "RandomHorizontalFlip")
        flip = (self._uniform(xb.shape[0], 0.0, 1.0) < self.p).to(xb.device)
        out = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomApply(_Random):
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
        self.p = _check_p(p, "RandomApply p")
        self.generator = generator

    def _inner(self, x: Tensor) -> Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = _as_batch(x, "RandomApply")
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


class RandomAffine(_Random):
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
        self.degrees = _range(degrees, "RandomAffine degrees", symmetric=True)
        if translate is not None:
            if len(translate) != 2 or not all(0.0 <= float(t) <= 1.0 for t in translate):
                raise ValueError(f"RandomAffine translate: expected two fractions in [0, 1], got {translate!r}")
            translate = (float(translate[0]), float(translate[1]))
        self.translate = translate
        if scale is not None:
            scale = _range(scale, "RandomAffine scale", symmetric=False)
            if scale[0] <= 0:
                raise ValueError(f"RandomAffine scale: expected positive values, got {scale!r}")
        self.scale = scale
        self.fill = float(fill)
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = _as_batch(x, type(self).__name__)
        _float_check(xb, type(self).__name__)
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


class RandomCrop(_Random):
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
        self.size = _pair(size, "RandomCrop size")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"RandomCrop padding: expected a non-negative int, got {padding!r}")
        self.padding = padding
        self.fill = float(fill)
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = _as_batch(x, "RandomCrop")
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


class RandomErasing(_Random):
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
        self.p = _check_p(p, "RandomErasing p")
        self.scale = _range(scale, "RandomErasing scale", symmetric=False)
        if not 0.0 < self.scale[1] <= 1.0 or self.scale[0] < 0.0:
            raise ValueError(f"RandomErasing scale: expected fractions in (0, 1], got {scale!r}")
        self.ratio = _range(ratio, "RandomErasing ratio", symmetric=False)
        if self.ratio[0] <= 0:
            raise ValueError(f"RandomErasing ratio: expected positive values, got {ratio!r}")
        self.value = float(value)
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = _as_batch(x, "RandomErasing")
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


def build_transforms(
    preset: str,
    image_size: int,
    train: bool,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    generator: torch.Generator | None = None,
) -> Compose:
    """The transform pipeline of a preset (see the module docstring).

    The pipeline takes a float ``(3, H, W)`` tensor in ``[0, 1]`` (any ``H, W``;
    PIL images and uint8 arrays also work, through a leading :class:`ToTensor`)
    and returns a normalised ``(3, image_size, image_size)`` tensor.

    Args:
        preset: One of :data:`PRESETS`.
        image_size: Output height and width.
        train: Augmented training pipeline if true, else resize + normalise.
        mean: Normalisation means.
        std: Normalisation standard deviations.
        generator: Shared by every random transform (see the module docstring).

    Returns:
        A :class:`Compose`.

    Raises:
        ValueError: On an unknown preset or a bad size.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {list(PRESETS)}, got {preset!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: expected an int >= 8, got {image_size!r}")
    g = generator
    head: list[Transform] = [ToTensor(), Resize(image_size)]
    norm = Normalize(mean, std)
    if not train:
        return Compose([*head, norm])
    if preset == "rafdb":
        pad = max(1, round(32 * image_size / 224))
        aug: list[Transform] = [
            RandomHorizontalFlip(generator=g),
            RandomApply(
                [RandomRotation(20, generator=g), RandomCrop(image_size, padding=pad, generator=g)],
                p=0.2,
                generator=g,
            ),
            norm,
            RandomErasing(p=0.5, scale=(0.02, 0.25), generator=g),
        ]
    elif preset == "affectnet":
        aug = [
            RandomHorizontalFlip(generator=g),
            RandomApply(
                RandomAffine(20, translate=(0.2, 0.2), scale=(0.8, 1.0), generator=g), p=0.7, generator=g
            ),
            norm,
            RandomErasing(p=0.5, scale=(0.02, 0.33), generator=g),
        ]
    else:  # demo
        aug = [
            RandomHorizontalFlip(generator=g),
            RandomApply(
                RandomAffine(10, translate=(0.05, 0.05), scale=(0.9, 1.05), generator=g), p=0.5, generator=g
            ),
            norm,
        ]
    return Compose([*head, *aug])
