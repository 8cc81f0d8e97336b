"""Dataset readers for the DAN recipe: RAF-DB, AffectNet, class folders, synthetic faces.

Readers (every one is a ``torch.utils.data.Dataset`` of ``(image, label)``, with
``.targets`` (list of int labels) and ``.classes`` (list of names)):

* :class:`RafDB` -- RAF-DB basic, as the authors read it::

      root/EmoLabel/list_patition_label.txt    "train_00001.jpg 5" per line (labels 1..7)
      root/Image/aligned/train_00001_aligned.jpg

* :class:`AffectNet` -- class folders ``root/<split>/<0..7>/*`` (split ``train``,
  ``val`` or ``test``), 8 classes or 7 without Contempt.
* :class:`ImageFolder` -- any ``root/<class name>/*`` tree (e.g. SFEW 2.0).
* :class:`dan_recipe.synthetic_faces.SyntheticFaces` -- procedurally rendered faces,
  no files.

Class mapping: labels are indices into a list of class names. RAF-DB, AffectNet
and the synthetic faces have fixed lists. An :class:`ImageFolder` sorts its folder
names, unless it is given the list (``classes=``): then every folder is mapped by
its name, a folder that is not in the list is an error
(:class:`UnknownClassesError`), and a class without a folder just has no samples.
A test split is read with the training split's list (:func:`build_dataset`'s
``classes``), so that label ``k`` means the same class in every split.

Errors: a missing file or directory, or a layout that is not the expected one,
raises at construction (``FileNotFoundError`` / ``ValueError``) with a message
that says what was expected and what was found. A file that exists but cannot be
decoded is *not* fatal: ``__getitem__`` warns once (``RuntimeWarning`` naming the
path) and returns ``None``; :func:`collate_skip_none` drops such samples from a
batch (and returns ``None`` for a batch with nothing left). Pass
``on_error="raise"`` to make unreadable images fatal instead.

Images are decoded with Pillow to RGB and converted to float tensors
``(3, H, W)`` in ``[0, 1]`` before ``transform`` is applied (so transforms work on
tensors; see :func:`dan_recipe.transforms.build_transforms`).

The class-balanced sampler is in :mod:`dan_recipe.samplers`, the metrics in
:mod:`dan_recipe.reporting`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, default_collate

from . import synthetic_faces
from . import transforms as T

__all__ = [
    "AFFECTNET_CLASSES",
    "IMAGE_EXTENSIONS",
    "RAFDB_CLASSES",
    "AffectNet",
    "ImageFolder",
    "RafDB",
    "UnknownClassesError",
    "build_dataset",
    "collate_skip_none",
    "dataset_labels",
    "parse_rafdb_labels",
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
            raise FileNotFoundError(f"ImageFolder root: {expected}; {_describe_dir(root)}")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"ImageFolder: no class folder: {expected}; {_describe_dir(root)}")
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
        preset: Transform preset (``transforms.PRESETS``); default by kind
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
            mapped by (see :class:`ImageFolder`). The other kinds have fixed classes.

    Returns:
        The dataset; it has ``.targets`` and ``.classes``.

    Raises:
        ValueError: On an unknown kind, missing root or inconsistent ``num_classes``
            (:class:`UnknownClassesError` for class folders not among ``classes``).
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
        ds = ImageFolder(folder, transform, on_error, classes=classes)
    if num_classes is not None and kind != "affectnet" and num_classes != len(ds.classes):
        raise ValueError(
            f"{kind} at {root}: expected num_classes={len(ds.classes)} (the dataset's classes "
            f"{ds.classes}), got num_classes={num_classes}"
        )
    return ds


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
