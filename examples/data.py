"""Datasets, a class-balanced sampler and confusion-matrix metrics for the DAN examples.

Readers (every one is a ``torch.utils.data.Dataset`` of ``(image, label)``, with
``.targets`` (list of int labels) and ``.classes`` (list of names)):

* :class:`RafDB` -- RAF-DB basic, as the authors read it::

      root/EmoLabel/list_patition_label.txt    "train_00001.jpg 5" per line (labels 1..7)
      root/Image/aligned/train_00001_aligned.jpg

* :class:`AffectNet` -- class folders ``root/<split>/<0..7>/*`` (split ``train``,
  ``val`` or ``test``), 8 classes or 7 without Contempt.
* :class:`ImageFolder` -- any ``root/<class name>/*`` tree (e.g. SFEW 2.0).
* :class:`synthetic_faces.SyntheticFaces` -- procedurally rendered faces, no files.

Errors: a missing file or directory, or a layout that is not the expected one,
raises at construction (``FileNotFoundError`` / ``ValueError``) with a message
that says what was expected and what was found. A file that exists but cannot be
decoded is *not* fatal: ``__getitem__`` warns once (``RuntimeWarning`` naming the
path) and returns ``None``; :func:`collate_skip_none` drops such samples from a
batch (and returns ``None`` for a batch with nothing left). Pass
``on_error="raise"`` to make unreadable images fatal instead.

Images are decoded with Pillow to RGB and converted to float tensors
``(3, H, W)`` in ``[0, 1]`` before ``transform`` is applied (so transforms work on
tensors; see ``transforms.build_transforms``).

Metrics: :func:`confusion_matrix`, :func:`accuracy_from_confusion`,
:func:`balanced_accuracy_from_confusion` (mean per-class recall, computed from
the confusion matrix, as the authors' corrected figures are).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import synthetic_faces
import torch
import transforms as T
from torch import Tensor
from torch.utils.data import Dataset, Sampler, default_collate

__all__ = [
    "AFFECTNET_CLASSES",
    "IMAGE_EXTENSIONS",
    "RAFDB_CLASSES",
    "AffectNet",
    "ClassBalancedSampler",
    "ImageFolder",
    "RafDB",
    "accuracy_from_confusion",
    "balanced_accuracy_from_confusion",
    "build_dataset",
    "collate_skip_none",
    "confusion_matrix",
    "per_class_recall",
]

#: RAF-DB class names; label ``i`` is line label ``i + 1`` of the annotation file.
RAFDB_CLASSES: tuple[str, ...] = synthetic_faces.CLASS_NAMES
#: AffectNet class names; label ``i`` is folder ``str(i)``. AffectNet-7 drops the last.
AFFECTNET_CLASSES: tuple[str, ...] = (
    "Neutral",
    "Happy",
    "Sad",
    "Surprise",
    "Fear",
    "Disgust",
    "Anger",
    "Contempt",
)
#: File name endings read as images (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

OnError = Literal["skip", "raise"]
Transform = Callable[[Tensor], Any]


# --------------------------------------------------------------------------------------
# Shared image loading
# --------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _describe_dir(path: Path, limit: int = 8) -> str:
    """A short listing of a directory for error messages."""
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
            raise FileNotFoundError(f"RAF-DB root: {expected}; {_describe_dir(root)}")
        label_file = root / RAFDB_LABEL_FILE
        if not label_file.is_file():
            raise FileNotFoundError(
                f"RAF-DB label file missing: {expected}; {_describe_dir(label_file.parent)}"
            )
        image_dir = root / RAFDB_IMAGE_DIR
        if not image_dir.is_dir():
            raise FileNotFoundError(
                f"RAF-DB image directory missing: {expected}; {_describe_dir(image_dir.parent)}"
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
            raise FileNotFoundError(f"AffectNet split folder missing: {expected}; {_describe_dir(root)}")
        found = {p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()}
        if not found & {str(k) for k in range(8)}:
            raise ValueError(f"AffectNet: no class folder 0..7: {expected}; {_describe_dir(folder)}")
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


class ImageFolder(_FileDataset):
    """Any ``root/<class name>/<images>`` tree; classes are the sorted folder names.

    Args:
        root: Folder whose sub-folders are the classes (hidden ones ignored).
        transform: Applied to the float ``(3, H, W)`` image.
        on_error: See :class:`RafDB`.
        classes: Optional explicit class order (folder names); the default sorts them.

    Raises:
        FileNotFoundError: If ``root`` is missing or a listed class folder is.
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
            raise FileNotFoundError(f"ImageFolder root: {expected}; {_describe_dir(root)}")
        if classes is None:
            classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not classes:
                raise ValueError(f"ImageFolder: no class folder: {expected}; {_describe_dir(root)}")
        else:
            absent = [c for c in classes if not (root / c).is_dir()]
            if absent:
                raise FileNotFoundError(f"ImageFolder: class folders {absent} missing; {_describe_dir(root)}")
        samples = [(p, k) for k, c in enumerate(classes) for p in _list_images(root / c)]
        if not samples:
            raise ValueError(
                f"ImageFolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders "
                f"of {root}; {expected}"
            )
        super().__init__(samples, classes, transform, on_error)
        self.root = root


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


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
# Factory
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
        f"holding <class name>/<images>; {_describe_dir(root)}"
    )


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
        preset: Transform preset (``transforms.PRESETS``); default by kind
            (synthetic ``demo``, rafdb ``rafdb``, affectnet ``affectnet``,
            imagefolder ``rafdb``).
        train: Augment (training pipeline); default ``split == "train"``.
        transform: Overrides the preset's pipeline if given.
        num_samples: Synthetic only: number of faces (default 3500 train, 700 test).
        seed: Synthetic only: base seed.
        hidden_regions: Synthetic only: regions not drawn.
        on_error: File datasets: ``"skip"`` or ``"raise"`` on unreadable images.

    Returns:
        The dataset; it has ``.targets`` and ``.classes``.

    Raises:
        ValueError: On an unknown kind, missing root or inconsistent ``num_classes``.
    """
    kinds = tuple(_DEFAULT_PRESET)
    if kind not in kinds:
        raise ValueError(f"kind: expected one of {list(kinds)}, got {kind!r}")
    if train is None:
        train = split == "train"
    if transform is None:
        transform = T.build_transforms(preset or _DEFAULT_PRESET[kind], image_size, train)
    if kind == "synthetic":
        if num_classes not in (None, len(synthetic_faces.CLASS_NAMES)):
            raise ValueError(f"synthetic faces have 7 classes, got num_classes={num_classes}")
        if split not in ("train", "test"):
            raise ValueError(f"synthetic split: expected 'train' or 'test', got {split!r}")
        n = num_samples if num_samples is not None else _SYNTHETIC_DEFAULT_SIZE[split]
        return synthetic_faces.SyntheticFaces(
            n, image_size, seed=seed, split=split, transform=transform, hidden_regions=hidden_regions
        )
    if root is None:
        raise ValueError(f"{kind}: expected a dataset root directory, got None")
    root = Path(root)
    ds: _FileDataset
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
        ds = ImageFolder(folder, transform, on_error)
    if num_classes is not None and kind != "affectnet" and num_classes != len(ds.classes):
        raise ValueError(f"{kind} at {root}: num_classes={num_classes}, but the dataset has {len(ds.classes)}")
    return ds


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def confusion_matrix(
    preds: Tensor | Sequence[int], targets: Tensor | Sequence[int], num_classes: int
) -> Tensor:
    """Counts ``cm[true, predicted]``.

    Args:
        preds: Predicted labels ``(N,)`` (or logits ``(N, num_classes)``, arg-maxed).
        targets: True labels ``(N,)``.
        num_classes: Number of classes.

    Returns:
        ``LongTensor (num_classes, num_classes)``; rows are true classes.

    Raises:
        ValueError: On mismatched lengths or labels outside ``[0, num_classes)``.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 1, 0], 2).tolist()
        [[1, 1], [0, 1]]
    """
    p = torch.as_tensor(preds)
    t = torch.as_tensor(targets)
    if p.dim() == 2:
        p = p.argmax(1)
    p, t = p.long().flatten().cpu(), t.long().flatten().cpu()
    if p.shape != t.shape:
        raise ValueError(
            f"confusion_matrix: expected as many predictions as targets, got {p.numel()} and {t.numel()}"
        )
    for name, v in (("preds", p), ("targets", t)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise ValueError(
                f"confusion_matrix: expected {name} in [0, {num_classes}), got range "
                f"[{int(v.min())}, {int(v.max())}]"
            )
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(
        num_classes, num_classes
    )


def _check_cm(cm: Tensor) -> Tensor:
    cm = torch.as_tensor(cm)
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {tuple(cm.shape)}")
    return cm.double()


def accuracy_from_confusion(cm: Tensor) -> float:
    """Overall accuracy, ``trace / total``; ``nan`` for an empty matrix."""
    c = _check_cm(cm)
    total = float(c.sum())
    return float(c.diagonal().sum()) / total if total > 0 else float("nan")


def per_class_recall(cm: Tensor) -> Tensor:
    """Recall of every class (``diag / row sum``); ``nan`` for classes without samples."""
    c = _check_cm(cm)
    support = c.sum(1)
    return torch.where(support > 0, c.diagonal() / support.clamp_min(1), torch.full_like(support, float("nan")))


def balanced_accuracy_from_confusion(cm: Tensor) -> float:
    """Mean per-class recall over the classes that have samples.

    Classes with no true samples (an all-zero row) are excluded from the mean,
    because their recall is undefined; predictions *into* such a class still
    lower the recall of the true classes. ``nan`` if no class has samples.

    Example:
        >>> balanced_accuracy_from_confusion(torch.tensor([[8, 0], [1, 1]]))
        0.75
    """
    r = per_class_recall(cm)
    r = r[~torch.isnan(r)]
    return float(r.mean()) if r.numel() else float("nan")
