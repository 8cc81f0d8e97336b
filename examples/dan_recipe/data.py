"""The data of a training run: readers, samplers, training augmentations, splits and loaders.

Readers (``torch.utils.data.Dataset`` s of ``(image, label)``, each with
``.targets`` (int labels) and ``.classes`` (names in label order)):

* :class:`RafDB`: RAF-DB basic, as the authors read it::

      root/EmoLabel/list_patition_label.txt    "train_00001.jpg 5" per line (labels 1..7)
      root/Image/aligned/train_00001_aligned.jpg

* :class:`AffectNet`: class folders ``root/<split>/<0..7>/*`` (``train``, ``val``
  or ``test``), 8 classes or 7 without Contempt.
* :class:`ImageFolder`: any ``root/<class name>/*`` tree (e.g. SFEW 2.0).
* :class:`dan_recipe.SyntheticFaces`: rendered faces, no files.

Labels index a list of class names: RAF-DB's and AffectNet's are fixed
(:data:`dan_recipe.utils.LABEL_SETS`); an :class:`ImageFolder` sorts its folder names,
unless it is given the list (``classes=``), as a test split is given the training
split's, so that label ``k`` means one class in every split.

A missing file or a layout that is not the expected one raises at construction
with a message that says what was expected and what was found. A file that exists
but cannot be decoded is *not* fatal: ``__getitem__`` warns once and returns
``None``, and :func:`collate_skip_none` drops it from its batch.

Then, for a run (:func:`build_run_data`, :func:`build_loaders`): the training
augmentations of each preset (:func:`build_transforms`, torch only), a stratified
validation split, and samplers whose order is a pure function of ``(seed, epoch)``
(so a resumed run sees what an uninterrupted one sees, and every rank of a
distributed run takes its share of one global order).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, default_collate

from .synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from .synthetic import SyntheticFaces
from .transforms import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    Resize,
    ToTensor,
    Transform,
    as_batch,
    eval_transform,
    float_check,
    pair,
)
from .utils import AFFECTNET_CLASSES, RAFDB_CLASSES, InputError, UsageError

__all__ = [
    "AUGMENT_PRESETS",
    "AffectNet",
    "ClassBalancedSampler",
    "EpochShuffleSampler",
    "ImageFolder",
    "Loaders",
    "RafDB",
    "RandomAffine",
    "RandomApply",
    "RandomCrop",
    "RandomErasing",
    "RandomHorizontalFlip",
    "RandomRotation",
    "RenderCache",
    "RunData",
    "ShardSampler",
    "UnknownClassesError",
    "build_dataset",
    "build_loaders",
    "build_run_data",
    "build_transforms",
    "collate_skip_none",
    "dataset_labels",
    "describe_dir",
    "parse_rafdb_labels",
    "stratified_split",
    "validation_folder",
]

OnError = Literal["skip", "raise"]


# --------------------------------------------------------------------------------------
# Shared image loading
# --------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def describe_dir(path: Path, limit: int = 8) -> str:
    """A short listing of a directory for error messages (or why there is none)."""
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a directory"
    names = sorted(os.listdir(path))
    if not names:
        return f"{path} is empty"
    shown = ", ".join(n + ("/" if (path / n).is_dir() else "") for n in names[:limit])
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return f"{path} contains: {shown}{more}"


def _load_rgb(path: Path) -> Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class _FileDataset(Dataset):
    """Base: a list of ``(path, label)`` read lazily with Pillow."""

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        classes: Sequence[str],
        transform: Transform | None,
        on_error: OnError,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error: expected 'skip' or 'raise', got {on_error!r}")
        self.samples = samples
        self.targets: list[int] = [y for _, y in samples]
        self.classes: list[str] = list(classes)
        self.transform = transform
        self.on_error = on_error
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, label = self.samples[index]
        try:
            img = _load_rgb(path)
        except Exception as e:  # PIL raises several types for broken files
            if self.on_error == "raise":
                raise OSError(f"cannot read image {path}: {e}") from e
            if str(path) not in self._warned:
                self._warned.add(str(path))
                warnings.warn(f"skipping unreadable image {path}: {e}", RuntimeWarning, stacklevel=2)
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes)"


def collate_skip_none(batch: Sequence[Any]) -> Any:
    """``default_collate`` that drops ``None`` samples (unreadable images).

    Args:
        batch: Samples as returned by a dataset of this module.

    Returns:
        The collated batch, or ``None`` if every sample was ``None`` (skip it).
    """
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return default_collate(kept)


# --------------------------------------------------------------------------------------
# RAF-DB
# --------------------------------------------------------------------------------------

RAFDB_LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"
RAFDB_IMAGE_DIR = Path("Image") / "aligned"


def parse_rafdb_labels(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Parse a RAF-DB label file into ``(file name, label 0..6)`` pairs.

    Each non-blank line is ``<name> <label>`` or ``<name> <label> <anything>``
    (some copies add a third column, which is ignored), labels 1..7.

    Args:
        path: The label file.

    Returns:
        Pairs in file order.

    Raises:
        ValueError: On a line with another number of columns, a non-integer
            label or a label outside 1..7; the message names the file and line.
    """
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            cols = line.split()
            if len(cols) not in (2, 3):
                raise ValueError(
                    f"{path}:{n}: expected '<image name> <label 1..7>' (2 or 3 columns), got {line!r}"
                )
            try:
                label = int(cols[1])
            except ValueError:
                raise ValueError(f"{path}:{n}: expected an integer label 1..7, got {line!r}") from None
            if not 1 <= label <= 7:
                raise ValueError(f"{path}:{n}: expected a label in 1..7, got {label} in {line!r}")
            out.append((cols[0], label - 1))
    return out


class RafDB(_FileDataset):
    """RAF-DB basic expression set (7 classes), read the way the authors read it.

    Layout::

        root/EmoLabel/list_patition_label.txt   lines "train_00001.jpg 5" (2 or 3 columns)
        root/Image/aligned/<stem>_aligned.jpg   e.g. train_00001_aligned.jpg

    The split is the name prefix (``train`` / ``test``); labels 1..7 become 0..6
    in the order :data:`RAFDB_CLASSES`. Every listed image of the split must
    exist (checked at construction).

    Args:
        root: Dataset root.
        split: ``"train"`` or ``"test"``.
        transform: Applied to the float ``(3, H, W)`` image.
        on_error: ``"skip"`` (warn, return ``None``) or ``"raise"`` for images
            that exist but cannot be decoded.

    Raises:
        FileNotFoundError: If the root, label file, image directory or a listed
            image is missing.
        ValueError: On a bad split, a malformed label line, a name with neither
            prefix, or a split without images.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Transform | None = None,
        on_error: OnError = "skip",
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"RafDB split: expected 'train' or 'test', got {split!r}")
        root = Path(root)
        expected = (
            f"expected RAF-DB layout {root}/{RAFDB_LABEL_FILE} and {root}/{RAFDB_IMAGE_DIR}/<name>_aligned.jpg"
        )
        if not root.is_dir():
            raise FileNotFoundError(f"RAF-DB root: {expected}; {describe_dir(root)}")
        label_file = root / RAFDB_LABEL_FILE
        if not label_file.is_file():
            raise FileNotFoundError(f"RAF-DB label file missing: {expected}; {describe_dir(label_file.parent)}")
        image_dir = root / RAFDB_IMAGE_DIR
        if not image_dir.is_dir():
            raise FileNotFoundError(
                f"RAF-DB image directory missing: {expected}; {describe_dir(image_dir.parent)}"
            )
        present = set(os.listdir(image_dir))
        samples: list[tuple[Path, int]] = []
        missing: list[str] = []
        for n, (name, label) in enumerate(parse_rafdb_labels(label_file), 1):
            if not name.startswith(("train", "test")):
                raise ValueError(
                    f"{label_file}: entry {n} {name!r}: expected a name starting with 'train' or 'test'"
                )
            if not name.startswith(split):
                continue
            fname = f"{Path(name).stem}_aligned.jpg"
            if fname not in present:
                missing.append(fname)
                continue
            samples.append((image_dir / fname, label))
        if missing:
            raise FileNotFoundError(
                f"RAF-DB: {len(missing)} images of split {split!r} listed in {label_file} are missing "
                f"from {image_dir} (expected <name>_aligned.jpg), e.g. {missing[:3]}"
            )
        if not samples:
            raise ValueError(
                f"RAF-DB: no {split!r} entries in {label_file} (expected names like {split}_00001.jpg)"
            )
        super().__init__(samples, RAFDB_CLASSES, transform, on_error)
        self.root, self.split = root, split


# --------------------------------------------------------------------------------------
# Class folders
# --------------------------------------------------------------------------------------


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p.name))


class AffectNet(_FileDataset):
    """AffectNet in class folders (8 classes, or 7 without Contempt).

    Layout: ``root/<split>/<k>/*`` with ``k`` in ``0..7`` in the order
    :data:`AFFECTNET_CLASSES` (Neutral, Happy, Sad, Surprise, Fear, Disgust,
    Anger, Contempt). Split folders are ``train`` and ``val``; ``test`` is accepted
    too. Entries that are not digit folders are ignored; a class folder that is
    missing or empty gives a warning (that class has no samples).

    Args:
        root: Dataset root.
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_classes: 8, or 7 to drop folder 7 (Contempt).
        transform: Applied to the float ``(3, H, W)`` image.
        on_error: See :class:`RafDB`.

    Raises:
        FileNotFoundError: If ``root/<split>`` is missing.
        ValueError: On a bad split or ``num_classes``, or no class folder / no image.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        num_classes: int = 8,
        transform: Transform | None = None,
        on_error: OnError = "skip",
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"AffectNet split: expected 'train', 'val' or 'test', got {split!r}")
        if num_classes not in (7, 8):
            raise ValueError(f"AffectNet num_classes: expected 7 or 8, got {num_classes!r}")
        root = Path(root)
        folder = root / split
        expected = f"expected AffectNet layout {root}/{split}/<0..7>/<images>"
        if not folder.is_dir():
            raise FileNotFoundError(f"AffectNet split folder missing: {expected}; {describe_dir(root)}")
        found = {p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()}
        if not found & {str(k) for k in range(8)}:
            raise ValueError(f"AffectNet: no class folder 0..7: {expected}; {describe_dir(folder)}")
        samples: list[tuple[Path, int]] = []
        empty = []
        for k in range(num_classes):
            sub = folder / str(k)
            files = _list_images(sub) if sub.is_dir() else []
            if not files:
                empty.append(k)
            samples.extend((p, k) for p in files)
        if not samples:
            raise ValueError(f"AffectNet: no images under {folder}/<0..{num_classes - 1}>; {expected}")
        if empty:
            warnings.warn(
                f"AffectNet {split}: class folders {empty} missing or empty under {folder}",
                RuntimeWarning,
                stacklevel=2,
            )
        super().__init__(samples, AFFECTNET_CLASSES[:num_classes], transform, on_error)
        self.root, self.split, self.num_classes = root, split, num_classes


class UnknownClassesError(ValueError):
    """Class folders that are not among the classes an :class:`ImageFolder` was given.

    Attributes:
        unknown: The folder names, sorted.
    """

    def __init__(self, message: str, unknown: Sequence[str]) -> None:
        super().__init__(message)
        self.unknown = list(unknown)


class ImageFolder(_FileDataset):
    """Any ``root/<class name>/<images>`` tree.

    Without ``classes`` the classes are the sorted folder names. With ``classes``
    (for example the training split's, to read a test split), label ``k`` is the
    folder named ``classes[k]``: every folder must be one of them, while a class
    without a folder is allowed and has no samples (:attr:`missing_classes`).

    Args:
        root: Folder whose sub-folders are the classes (hidden ones ignored).
        transform: Applied to the float ``(3, H, W)`` image.
        on_error: See :class:`RafDB`.
        classes: The class names in label order; default: the sorted folder names.

    Attributes:
        missing_classes: Names of ``classes`` without a folder under ``root``.

    Raises:
        FileNotFoundError: If ``root`` is missing.
        UnknownClassesError: If ``classes`` is given and a folder is not among them.
        ValueError: If there is no class folder or no image at all.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Transform | None = None,
        on_error: OnError = "skip",
        classes: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        expected = f"expected class folders {root}/<class name>/<images>"
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder root: {expected}; {describe_dir(root)}")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"ImageFolder: no class folder: {expected}; {describe_dir(root)}")
        if classes is None:
            classes = folders
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise UnknownClassesError(
                f"ImageFolder {root}: expected class folders among {list(classes)}, got {unknown}", unknown
            )
        self.missing_classes = [c for c in classes if c not in folders]
        samples = [(p, k) for k, c in enumerate(classes) if c in folders for p in _list_images(root / c)]
        if not samples:
            raise ValueError(
                f"ImageFolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders "
                f"of {root}; {expected}"
            )
        super().__init__(samples, classes, transform, on_error)
        self.root = root


def dataset_labels(ds: Dataset) -> list[int]:
    """Integer labels of a dataset without loading its images.

    Reads ``targets``, ``labels`` or ``samples`` (``(path, label)`` pairs), through
    any nesting of ``torch.utils.data.Subset``.

    Raises:
        TypeError: If the dataset has none of these.
    """
    if isinstance(ds, Subset):
        inner = dataset_labels(ds.dataset)
        return [inner[i] for i in ds.indices]
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return [int(v) for v in getattr(ds, attr)]
    if hasattr(ds, "samples"):
        return [int(s[1]) for s in ds.samples]
    raise TypeError(f"cannot read labels of {type(ds).__name__} without loading images")


# --------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` that is a function of (seed, epoch) only."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ShardSampler(Sampler[int]):
    """Rank ``r``'s share of another sampler's indices (or of ``range(n)``).

    With ``pad=True`` (training) every rank gets the same count, the list being
    wrapped around as DistributedSampler does; with ``pad=False`` (evaluation)
    each index is visited exactly once over all ranks, so summed confusion
    matrices count every sample once.
    """

    def __init__(self, base: Sampler[int] | int, rank: int, world: int, *, pad: bool) -> None:
        self.base = base
        self.rank = rank
        self.world = world
        self.pad = pad

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _indices(self) -> list[int]:
        idx = list(range(self.base)) if isinstance(self.base, int) else list(iter(self.base))
        if self.pad and idx:
            total = math.ceil(len(idx) / self.world) * self.world
            idx = (idx * math.ceil(total / len(idx)))[:total]
        return idx[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        n = self.base if isinstance(self.base, int) else len(self.base)
        if self.pad:
            return math.ceil(n / self.world)
        return len(range(self.rank, n, self.world))


class ClassBalancedSampler(Sampler[int]):
    """Sample indices with replacement, each with weight ``1 / count(its class)``.

    Every class is then drawn equally often in expectation, whatever its size
    (AffectNet's recipe). Works from any list of labels (not only an image folder).
    The draw of an epoch is a pure function of ``(seed, epoch)``; call
    :meth:`set_epoch` at the start of every epoch. With ``world_size > 1`` every
    rank takes the strided shard ``rank::world_size`` of the same global draw, so
    the ranks together see exactly one global draw (the draw is padded, with its
    own first indices, to a multiple of ``world_size``).

    Args:
        labels: Label of every dataset index (ints, any values).
        num_samples: Size of the global draw per epoch; default ``len(labels)``.
        seed: Base seed.
        rank: This process's rank.
        world_size: Number of processes.

    Raises:
        ValueError: On empty labels or bad sizes / ranks.
    """

    def __init__(
        self,
        labels: Sequence[int] | Tensor,
        num_samples: int | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        lab = torch.as_tensor(labels if not isinstance(labels, Tensor) else labels.cpu()).long().flatten()
        if lab.numel() == 0:
            raise ValueError("ClassBalancedSampler: expected a non-empty list of labels, got 0")
        if num_samples is None:
            num_samples = int(lab.numel())
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"ClassBalancedSampler num_samples: expected a positive int, got {num_samples!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ClassBalancedSampler: expected 0 <= rank < world_size, got {rank}, {world_size}")
        _, inverse, counts = torch.unique(lab, return_inverse=True, return_counts=True)
        self.weights = (1.0 / counts.double())[inverse]
        self.num_samples = num_samples
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draw of ``epoch`` (deterministic given the seed)."""
        self.epoch = int(epoch)

    def global_indices(self) -> list[int]:
        """The whole draw of the current epoch (before sharding, after padding)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist()
        total = math.ceil(self.num_samples / self.world_size) * self.world_size
        idx += idx[: total - len(idx)]
        return idx

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_indices()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)


# --------------------------------------------------------------------------------------
# Training augmentations (torch only)
# --------------------------------------------------------------------------------------


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


#: Names accepted by :func:`build_transforms`.
AUGMENT_PRESETS: tuple[str, ...] = ("rafdb", "affectnet", "demo")


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
        preset: One of :data:`AUGMENT_PRESETS`.
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
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"preset: expected one of {list(AUGMENT_PRESETS)}, got {preset!r}")
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


# --------------------------------------------------------------------------------------
# The splits and loaders of a run
# --------------------------------------------------------------------------------------


@dataclass
class RunData:
    """The datasets of a run.

    Attributes:
        train: Training split (augmented), ``None`` for ``--eval-only``.
        val: Validation split, or ``None`` (then ``no_validation`` says why).
        test: Test split.
        class_names: Names in label order; every split uses them.
        no_validation: Why there is no validation split, or ``None``.
        classes_without_samples: For each split, the classes it has no sample of.
        collate: The loaders' collate function (drops unreadable images).
        origins: Where each split came from, in words (logged, and kept in ``metrics.json``).
    """

    train: Dataset | None
    val: Dataset | None
    test: Dataset
    class_names: list[str]
    no_validation: str | None = None
    classes_without_samples: dict[str, list[str]] = field(default_factory=dict)
    collate: Callable[[Sequence[Any]], Any] = collate_skip_none
    origins: dict[str, str] = field(default_factory=dict)


class RenderCache(Dataset):
    """Synthetic faces rendered once and kept (uint8), the transform applied per access.

    A synthetic sample is a pure function of its index, so caching changes nothing
    but the time: rendering is then paid once instead of once per epoch.
    """

    def __init__(self, faces: Any) -> None:
        self.faces = faces
        self.targets = list(faces.targets)
        self.classes = list(faces.classes)
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self._cache.get(index)
        if img is None:
            img = torch.from_numpy(self.faces.render(index)).permute(2, 0, 1).contiguous()
            self._cache[index] = img
        x = img.float().div_(255.0)
        if self.faces.transform is not None:
            x = self.faces.transform(x)
        return x, self.targets[index]


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)``: ``fraction`` of every class (at least 1 if it has 2+)."""
    g = torch.Generator().manual_seed(seed + 7919)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, val = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        k = round(len(idx) * fraction)
        if fraction > 0 and k == 0 and len(idx) >= 2:
            k = 1
        val.extend(perm[:k])
        train.extend(perm[k:])
    return sorted(train), sorted(val)


# --------------------------------------------------------------------------------------
# Reading one split
# --------------------------------------------------------------------------------------

_DEFAULT_PRESET = {"synthetic": "demo", "rafdb": "rafdb", "affectnet": "affectnet", "imagefolder": "rafdb"}
_SYNTHETIC_DEFAULT_SIZE = {"train": 3500, "test": 700}


def _find_subfolder(root: Path, split: str) -> Path:
    aliases = {"test": ("test", "val", "validation"), "val": ("val", "validation", "test")}.get(split, (split,))
    if root.is_dir():
        by_lower = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
        for a in aliases:
            if a in by_lower:
                return by_lower[a]
    raise FileNotFoundError(
        f"imagefolder split {split!r}: expected a folder {root}/<{'|'.join(aliases)}> (any case) "
        f"holding <class name>/<images>; {describe_dir(root)}"
    )


def validation_folder(root: str | os.PathLike[str]) -> Path | None:
    """A class-folder tree's own validation split: ``val/`` (or ``validation/``), when ``test/`` is there too.

    Without ``test/``, a ``val/`` folder is the test split (as AffectNet's is), and the
    validation split is held out from ``train/``.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    by_lower = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    if "test" not in by_lower:
        return None
    return by_lower.get("val") or by_lower.get("validation")


def build_dataset(
    kind: str,
    root: str | os.PathLike[str] | None = None,
    split: str | None = "train",
    image_size: int = 224,
    num_classes: int | None = None,
    preset: str | None = None,
    *,
    train: bool | None = None,
    transform: Transform | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    hidden_regions: Sequence[str] = (),
    on_error: OnError = "skip",
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Build a dataset with the preset's transforms.

    Args:
        kind: ``"synthetic"``, ``"rafdb"``, ``"affectnet"`` or ``"imagefolder"``.
        root: Dataset directory (ignored for ``synthetic``). For ``imagefolder``
            the split's sub-folder is used (``root/<split>``, any case; ``test``
            falls back to ``val``/``validation``), or ``root`` itself if
            ``split`` is ``None``.
        split: ``"train"`` or ``"test"`` (AffectNet: ``"test"`` reads ``val`` when
            there is no ``test`` folder, as AffectNet ships no public test set).
        image_size: Output image size.
        num_classes: AffectNet 7 or 8 (default 8); for the others it must equal
            the dataset's own number of classes if given.
        preset: Transform preset (``AUGMENT_PRESETS``); default by kind
            (synthetic ``demo``, rafdb ``rafdb``, affectnet ``affectnet``,
            imagefolder ``rafdb``).
        train: Augment (training pipeline); default ``split == "train"``.
        transform: Overrides the preset's pipeline if given.
        num_samples: Synthetic only: number of faces (default 3500 train, 700 test).
        seed: Synthetic only: base seed.
        hidden_regions: Synthetic only: regions not drawn.
        on_error: File datasets: ``"skip"`` or ``"raise"`` on unreadable images.
        classes: ``imagefolder`` only: the class names in label order (e.g. the
            training split's when reading the test split), which the folders are
            mapped by (see :class:`dan_recipe.data.ImageFolder`). The other kinds have fixed classes.

    Returns:
        The dataset; it has ``.targets`` and ``.classes``.

    Raises:
        ValueError: On an unknown kind, missing root or inconsistent ``num_classes``
            (:class:`dan_recipe.data.UnknownClassesError` for class folders not among ``classes``).
    """
    kinds = tuple(_DEFAULT_PRESET)
    if kind not in kinds:
        raise ValueError(f"kind: expected one of {list(kinds)}, got {kind!r}")
    if train is None:
        train = split == "train"
    if transform is None:
        transform = build_transforms(preset or _DEFAULT_PRESET[kind], image_size, train)
    if kind == "synthetic":
        if num_classes not in (None, len(SYNTHETIC_CLASSES)):
            raise ValueError(f"synthetic faces have 7 classes, got num_classes={num_classes}")
        if split not in ("train", "test"):
            raise ValueError(f"synthetic split: expected 'train' or 'test', got {split!r}")
        n = num_samples if num_samples is not None else _SYNTHETIC_DEFAULT_SIZE[split]
        return SyntheticFaces(
            n, image_size, seed=seed, split=split, transform=transform, hidden_regions=hidden_regions
        )
    if root is None:
        raise ValueError(f"{kind}: expected a dataset root directory, got None")
    root = Path(root)
    ds: RafDB | AffectNet | ImageFolder
    if kind == "rafdb":
        ds = RafDB(root, split, transform, on_error)
    elif kind == "affectnet":
        nc = 8 if num_classes is None else num_classes
        sp = split
        if split == "test" and not (root / "test").is_dir():
            sp = "val"
        ds = AffectNet(root, sp, nc, transform, on_error)
    else:
        folder = root if split is None else _find_subfolder(root, split)
        ds = ImageFolder(folder, transform, on_error, classes=classes)
    if num_classes is not None and kind != "affectnet" and num_classes != len(ds.classes):
        raise ValueError(
            f"{kind} at {root}: expected num_classes={len(ds.classes)} (the dataset's classes "
            f"{ds.classes}), got num_classes={num_classes}"
        )
    return ds


# --------------------------------------------------------------------------------------
# Reading the splits, with one-line errors
# --------------------------------------------------------------------------------------


def _check_data_root(cfg: Mapping[str, Any]) -> None:
    kind, n = cfg["data"], cfg["num_classes"]
    if kind == "affectnet" and n not in (None, 7, 8):
        raise UsageError(f"expected 7 or 8 for AffectNet, got {n}", subject=f"--num-classes {n}")
    if kind == "synthetic":
        return
    root = Path(cfg["data_root"])
    what = f"expected the {kind} dataset directory"
    if not root.exists():
        raise InputError(f"{what}, got a path that does not exist", subject=f"--data-root {root}")
    if not root.is_dir():
        raise InputError(f"{what}, got a file", subject=f"--data-root {root}")


def _read_split(
    cfg: Mapping[str, Any], split: str, *, train: bool, classes: Sequence[str] | None, whose: str
) -> Dataset:
    """One split through :func:`build_dataset`; a reader's error becomes an :class:`InputError`."""
    kind = cfg["data"]
    kw: dict[str, Any] = {}
    if kind == "synthetic":
        kw = {
            "num_samples": cfg["synthetic_train" if split == "train" else "synthetic_test"],
            "seed": cfg["seed"],
        }
    if cfg["augment"] == "none":
        kw["transform"] = build_transforms("demo", cfg["image_size"], False)
    num_classes = cfg["num_classes"] if kind == "affectnet" else None
    preset = None if cfg["augment"] == "none" else cfg["augment"]
    try:
        ds = build_dataset(
            kind,
            cfg["data_root"],
            split,
            cfg["image_size"],
            num_classes,
            preset,
            train=train,
            classes=classes if kind == "imagefolder" else None,
            **kw,
        )
    except UnknownClassesError as exc:
        names = ", ".join(repr(c) for c in exc.unknown)
        raise InputError(
            f"the {split} split has class folders {names} that {whose} lacks; expected only classes of "
            f"{whose} ({', '.join(classes or ())})",
            subject=f"--data-root {cfg['data_root']}",
        ) from None
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise InputError(str(exc), subject=f"--data-root {cfg['data_root']}") from None
    if kind == "synthetic" and cfg["num_workers"] == 0:
        ds = RenderCache(ds)
    return ds


def _check_classes(cfg: Mapping[str, Any], ds: Dataset, classes: Sequence[str] | None, whose: str) -> list[str]:
    """The class list of a run, checked against ``--num-classes`` and the reference list."""
    own = list(getattr(ds, "classes", []))
    if classes is not None and own != list(classes):
        raise UsageError(
            f"expected the classes of {whose} ({', '.join(classes)}), got the dataset's ({', '.join(own)})",
            subject=f"--data {cfg['data']}",
        )
    n = cfg["num_classes"]
    if n is not None and n != len(own) and cfg["data"] != "affectnet":
        raise UsageError(
            f"expected {len(own)}, the number of classes of the {cfg['data']} data at "
            f"{cfg['data_root'] or 'synthetic'} ({', '.join(own)})",
            subject=f"--num-classes {n}",
        )
    return own


def _classes_without_samples(ds: Dataset, class_names: Sequence[str]) -> list[str]:
    counts = torch.bincount(torch.tensor(dataset_labels(ds), dtype=torch.long), minlength=len(class_names))
    return [name for name, c in zip(class_names, counts.tolist(), strict=True) if c == 0]


def build_run_data(
    cfg: Mapping[str, Any],
    *,
    class_names: Sequence[str] | None = None,
    whose: str = "the training split",
    flagged: Collection[str] = (),
) -> RunData:
    """Read the splits of a run as ``cfg`` says.

    Args:
        cfg: The run's configuration.
        class_names: For ``--eval-only``: the checkpoint's class list (only the test
            split is read then); ``None`` to train (the list is the training split's).
        whose: Where ``class_names`` came from, for the messages.
        flagged: The settings given as flags (a flag the data makes moot is an error, never ignored).

    Returns:
        The datasets and class list.

    Raises:
        UsageError, InputError: For every mistake in ``--data-root``, ``--num-classes`` and the
            class folders (see the module docstring).
    """
    _check_data_root(cfg)
    if class_names is not None or cfg["eval_only"]:
        test = _read_split(cfg, "test", train=False, classes=class_names, whose=whose)
        names = _check_classes(cfg, test, class_names if cfg["data"] != "imagefolder" else None, whose)
        return RunData(
            None,
            None,
            test,
            names,
            "--eval-only",
            {"test": _classes_without_samples(test, names)},
            origins={"test": _origin(cfg, "test", test)},
        )
    train_aug = _read_split(cfg, "train", train=True, classes=None, whose=whose)
    names = _check_classes(cfg, train_aug, None, whose)
    test = _read_split(cfg, "test", train=False, classes=names, whose=whose)
    _check_classes(cfg, test, names if cfg["data"] != "imagefolder" else None, whose)
    train, val, no_validation = train_aug, None, None
    root = cfg["data_root"]
    origins = {"train": _origin(cfg, "train", train_aug), "test": _origin(cfg, "test", test)}
    own_val = validation_folder(root) if cfg["data"] == "imagefolder" else None
    if own_val is not None:
        if "val_fraction" in flagged:
            raise UsageError(
                f"the class folders have their own validation split {own_val}, which is used; "
                "drop --val-fraction (or rename the folder to hold out part of train/ instead)",
                subject=f"--val-fraction {cfg['val_fraction']}",
            )
        val = _read_split(cfg, "val", train=False, classes=names, whose=whose)
        origins["val"] = f"{own_val} ({len(val)} images; --val-fraction is not used)"
    elif cfg["val_fraction"] == 0:
        no_validation = "no validation split (--val-fraction 0)"
    else:
        tr_idx, va_idx = stratified_split(dataset_labels(train_aug), cfg["val_fraction"], cfg["seed"])
        if va_idx:
            train_plain = _read_split(cfg, "train", train=False, classes=None, whose=whose)
            train, val = Subset(train_aug, tr_idx), Subset(train_plain, va_idx)
            origins["val"] = (
                f"{len(va_idx)} images held out from the training split (--val-fraction "
                f"{cfg['val_fraction']}, stratified)"
            )
        else:
            no_validation = (
                f"the validation split is empty: --val-fraction {cfg['val_fraction']} of "
                f"{len(train_aug)} training images holds out none"
            )
    missing = {"test": _classes_without_samples(test, names)}
    if val is not None:
        missing["val"] = _classes_without_samples(val, names)
    if val is None:
        origins["val"] = f"none ({no_validation})"
    return RunData(train, val, test, names, no_validation, missing, origins=origins)


def _origin(cfg: Mapping[str, Any], split: str, ds: Dataset) -> str:
    """Where a split came from, for the log."""
    if cfg["data"] == "synthetic":
        return f"{len(ds)} synthetic faces (seed {cfg['seed']}, {split} stream)"
    inner = ds.faces if isinstance(ds, RenderCache) else ds
    where = getattr(inner, "root", cfg["data_root"])
    if cfg["data"] == "rafdb":
        where = f"{where} ({split}_* entries of {RAFDB_LABEL_FILE})"
    return f"{where} ({len(ds)} images)"


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


@dataclass
class Loaders:
    """The run's data loaders; ``train_sampler.set_epoch`` before every epoch."""

    train: DataLoader | None
    train_sampler: Sampler[int] | None
    val: DataLoader | None
    test: DataLoader


def _loader(
    ds: Dataset,
    batch: int,
    sampler: Sampler | None,
    cfg: Mapping[str, Any],
    collate: Any,
    device: torch.device,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        num_workers=cfg["num_workers"],
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=False,
    )


def build_loaders(
    data: RunData, cfg: Mapping[str, Any], device: torch.device, per_rank: int, *, rank: int = 0, world: int = 1
) -> Loaders:
    """Loaders of every split: training order by ``(seed, epoch)``, sharded over ranks.

    Training draws class-balanced samples with ``--balanced-sampler``, else a
    shuffle per epoch (DistributedSampler under torchrun). Evaluation visits every
    sample exactly once over all ranks.
    """

    def eval_loader(ds: Dataset) -> DataLoader:
        sampler = ShardSampler(len(ds), rank, world, pad=False) if world > 1 else None
        return _loader(ds, per_rank, sampler, cfg, data.collate, device)

    test = eval_loader(data.test)
    val = eval_loader(data.val) if data.val is not None else None
    if data.train is None:
        return Loaders(None, None, val, test)
    sampler: Sampler[int]
    if cfg["balanced_sampler"]:  # one global draw per (seed, epoch), sharded over ranks
        labels = dataset_labels(data.train)
        sampler = ClassBalancedSampler(labels, seed=cfg["seed"], rank=rank, world_size=world)
    elif world > 1:
        sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"])
    else:
        sampler = EpochShuffleSampler(len(data.train), cfg["seed"])
    n_rank = len(sampler)
    drop_last = n_rank > per_rank and n_rank % per_rank == 1  # no BatchNorm batch of one
    train = _loader(data.train, per_rank, sampler, cfg, data.collate, device, drop_last=drop_last)
    return Loaders(train, sampler, val, test)
