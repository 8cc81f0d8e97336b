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
* evaluation (``train=False``), any preset: :func:`eval_transform`, resize and
  normalisation; the same pipeline prepares images for a trained model.

The random transforms live in :mod:`dan_recipe.augment` and are re-exported here.

Example:
    >>> import torch
    >>> from dan_recipe import transforms as T
    >>> tf = T.build_transforms("rafdb", 64, train=True, generator=torch.Generator().manual_seed(0))
    >>> tf(torch.rand(3, 100, 100)).shape
    torch.Size([3, 64, 64])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._transform_checks import Transform, as_batch, float_check, pair
from .augment import (
    RandomAffine,
    RandomApply,
    RandomCrop,
    RandomErasing,
    RandomHorizontalFlip,
    RandomRotation,
)

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
    "eval_transform",
]

#: ImageNet channel means (RGB), as the authors normalise.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: ImageNet channel standard deviations (RGB).
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Names accepted by :func:`build_transforms`.
PRESETS: tuple[str, ...] = ("rafdb", "affectnet", "demo")


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
        self.size = pair(size, "Resize size")
        self.antialias = antialias

    def __call__(self, x: Tensor) -> Tensor:
        xb, single = as_batch(x, "Resize")
        float_check(xb, "Resize")
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
        xb, single = as_batch(x, "Normalize")
        float_check(xb, "Normalize")
        if xb.shape[1] != len(self.mean):
            raise ValueError(f"Normalize: expected {len(self.mean)} channels, got {xb.shape[1]}")
        mean = torch.tensor(self.mean, dtype=xb.dtype, device=xb.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=xb.dtype, device=xb.device).view(1, -1, 1, 1)
        out = (xb - mean) / std
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Evaluation preprocessing: any image to a normalised ``(3, image_size, image_size)`` tensor.

    :class:`ToTensor` (PIL image, ``uint8`` array or tensor, float tensor in
    ``[0, 1]``), :class:`Resize` to a square and :class:`Normalize`. This is what a
    model trained by the recipe saw at evaluation time; take ``image_size``, ``mean``
    and ``std`` from :func:`dan_recipe.checkpoints.load_model`'s info.

    Args:
        image_size: Output height and width (>= 8).
        mean: Normalisation means.
        std: Normalisation standard deviations.

    Returns:
        A :class:`Compose`; it also takes a batch ``(B, 3, H, W)`` of float images.

    Raises:
        ValueError: On a bad size, mean or std.

    Example:
        >>> import numpy as np
        >>> eval_transform(48)(np.zeros((120, 90, 3), np.uint8)).shape
        torch.Size([3, 48, 48])
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: expected an int >= 8, got {image_size!r}")
    return Compose([ToTensor(), Resize(image_size), Normalize(mean, std)])


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
        train: Augmented training pipeline if true, else :func:`eval_transform`.
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
    if not train:
        return eval_transform(image_size, mean, std)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: expected an int >= 8, got {image_size!r}")
    g = generator
    head: list[Transform] = [ToTensor(), Resize(image_size)]
    norm = Normalize(mean, std)
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
