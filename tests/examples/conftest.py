"""Fixtures for the examples' tests: ``examples/`` on ``sys.path`` (for ``dan_recipe``) and tiny dataset trees.

The tree builders are fixtures that return the builder function, so a test calls
them like plain functions::

    def test_something(tmp_path, make_rafdb_tree):
        root = make_rafdb_tree(tmp_path, 14)

Builders (stable signatures, other test files rely on them):

* ``make_rafdb_tree(base, n=14, *, n_test=None, columns=2, corrupt=0, size=32) -> root``
* ``make_affectnet_tree(base, n_per_class=2, *, splits=("train", "val"), num_folders=8,
  corrupt=0, size=32) -> root``
* ``make_imagefolder_tree(base, n_per_class=2, *, classes=("Angry", "Happy", "Neutral"),
  splits=("train", "test"), corrupt=0, size=32) -> root``

Each writes small JPEG faces rendered by ``dan_recipe.synthetic_faces`` (class ``k`` draws
synthetic class ``k % 7``, so a model can learn something from them) under a new
folder of ``base`` and returns that folder. ``corrupt=c`` overwrites the first
``c`` training images with bytes that are not an image.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

CORRUPT_BYTES = b"this is not a JPEG file\x00\xff\xd8 truncated"


def _write_face(path: Path, label: int, seed: int, size: int) -> None:
    import numpy as np
    from dan_recipe import synthetic
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = synthetic.render_face(label % 7, np.random.default_rng(seed), size)
    Image.fromarray(img).save(path, format="JPEG", quality=90)


def _corrupt(paths: Sequence[Path], count: int) -> None:
    for p in list(paths)[:count]:
        p.write_bytes(CORRUPT_BYTES)


def build_rafdb_tree(
    base: Path, n: int = 14, *, n_test: int | None = None, columns: int = 2, corrupt: int = 0, size: int = 32
) -> Path:
    """RAF-DB layout with ``n`` train and ``n_test`` (default ``n``) test images.

    Labels cycle 1..7 (file labels), so image ``i`` has label ``i % 7`` (0-based).
    ``columns=3`` adds a third column to every line.
    """
    root = Path(base) / "rafdb"
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    img_dir = root / "Image" / "aligned"
    lines, train_paths = [], []
    for split, count in (("train", n), ("test", n if n_test is None else n_test)):
        for i in range(count):
            name = f"{split}_{i + 1:05d}.jpg"
            label = i % 7
            path = img_dir / f"{split}_{i + 1:05d}_aligned.jpg"
            _write_face(path, label, seed=i + (0 if split == "train" else 10_000), size=size)
            if split == "train":
                train_paths.append(path)
            extra = " 0" if columns == 3 else ""
            lines.append(f"{name} {label + 1}{extra}")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    _corrupt(train_paths, corrupt)
    return root


def build_affectnet_tree(
    base: Path,
    n_per_class: int = 2,
    *,
    splits: Sequence[str] = ("train", "val"),
    num_folders: int = 8,
    corrupt: int = 0,
    size: int = 32,
) -> Path:
    """AffectNet class-folder layout ``root/<split>/<0..num_folders-1>/*.jpg``."""
    root = Path(base) / "affectnet"
    first: list[Path] = []
    for s, split in enumerate(splits):
        for k in range(num_folders):
            for i in range(n_per_class):
                path = root / split / str(k) / f"img_{k}_{i}.jpg"
                _write_face(path, k, seed=1000 * s + 10 * k + i, size=size)
                if s == 0:
                    first.append(path)
    _corrupt(first, corrupt)
    return root


def build_imagefolder_tree(
    base: Path,
    n_per_class: int = 2,
    *,
    classes: Sequence[str] = ("Angry", "Happy", "Neutral"),
    splits: Sequence[str] | None = ("train", "test"),
    corrupt: int = 0,
    size: int = 32,
) -> Path:
    """Class folders ``root/<split>/<class>/*.jpg`` (or ``root/<class>/*.jpg`` if ``splits`` is None)."""
    root = Path(base) / "imagefolder"
    first: list[Path] = []
    for s, split in enumerate(splits if splits is not None else [None]):
        top = root if split is None else root / split
        for k, c in enumerate(classes):
            for i in range(n_per_class):
                path = top / c / f"{c.lower()}_{i}.jpg"
                _write_face(path, k, seed=2000 * s + 10 * k + i, size=size)
                if s == 0:
                    first.append(path)
    _corrupt(first, corrupt)
    return root


@pytest.fixture
def make_rafdb_tree() -> Callable[..., Path]:
    """The RAF-DB tree builder (see the module docstring)."""
    return build_rafdb_tree


@pytest.fixture
def make_affectnet_tree() -> Callable[..., Path]:
    """The AffectNet tree builder (see the module docstring)."""
    return build_affectnet_tree


@pytest.fixture
def make_imagefolder_tree() -> Callable[..., Path]:
    """The class-folder tree builder (see the module docstring)."""
    return build_imagefolder_tree
