"""The input side that inference shares with training: image files, resize and normalise (torch only).

* :func:`eval_transform` is what a trained model sees at evaluation time:
  :class:`ToTensor` (PIL image, ``uint8`` array or tensor), :class:`Resize` to a
  square and :class:`Normalize`. The photo commands prepare face crops with it,
  with the image size and normalisation a checkpoint records. The training
  augmentations are :mod:`dan_recipe.data`'s (``predict.py`` never loads them).
* :data:`IMAGE_EXTENSIONS`: the file endings read as images.

Every transform takes a float tensor ``(C, H, W)`` or a batch ``(B, C, H, W)`` and
returns one of the same kind. Written with torch alone: torchvision from PyPI does
not import beside this project's CPU build of torch, so nothing here needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "Compose",
    "Normalize",
    "Resize",
    "ToTensor",
    "Transform",
    "eval_transform",
]

#: ImageNet channel means (RGB), as the authors normalise.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: ImageNet channel standard deviations (RGB).
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: File name endings read as images (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

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
