"""Procedurally rendered cartoon faces with seven expressions: a dataset that needs no files.

The classes follow RAF-DB's label order (:data:`CLASS_NAMES`). Every expression is
a combination of states of four facial *regions* (:data:`REGIONS`): brows, eyes,
nose and mouth. The table :data:`REGION_STATES` is built so that **no region
decides the class on its own**: for every region there is a pair of classes that
differ *only* in that region, so hiding the region (``hidden_regions=``) makes
those two classes identical in distribution (:func:`confusable_pairs`). A model
has to combine cues from several regions, which is what DAN's multiple attention
heads are meant to do.

=========  =============  ======  =======  =======
class      brows          eyes    nose     mouth
=========  =============  ======  =======  =======
Surprise   raised         wide    plain    open
Fear       inner_raised   wide    plain    frown
Disgust    lowered        narrow  wrinkle  frown
Happiness  neutral        normal  plain    smile
Sadness    inner_raised   narrow  plain    frown
Anger      lowered        narrow  plain    frown
Neutral    neutral        normal  plain    neutral
=========  =============  ======  =======  =======

Pairs that differ in one region only: brows (Sadness, Anger), eyes (Fear,
Sadness), nose (Disgust, Anger), mouth (Happiness, Neutral). A cheek region was
considered and rejected: with cheeks as a fifth region the pair requirement
forces classes such as a Happiness without a smile (one pair per region must
form a forest over the seven classes). The smile draws its own cheek creases,
so the cheeks belong to the mouth region here.

Nuisance variation, drawn from the sample's random generator in an order that
never depends on the label or the hidden regions: head rotation (+-15 degrees),
scale, shift, face shape, skin tone, hair, feature colours and small geometry
jitter, background colour, gradient and low-frequency texture, a lighting
gradient, Gaussian pixel noise and, with probability 0.3, one occluder (a bar
or a blob) that may cover part of the face but is too small to cover all four
regions. Because of that ordering, two classes rendered with generators in the
same state differ exactly in the pixels of the regions where their states differ.

Rendering is vectorised numpy on a pixel grid (signed distances, anti-aliased
edges); a 64 x 64 face takes a fraction of a millisecond.

Example:
    >>> from dan_recipe import synthetic_faces as sf
    >>> img = sf.render_face(0, 123, size=64)
    >>> img.shape, img.dtype.name
    ((64, 64, 3), 'uint8')
    >>> sf.confusable_pairs("nose")
    [(2, 5)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import face_drawing

__all__ = [
    "CLASS_NAMES",
    "REGIONS",
    "REGION_STATES",
    "REGION_VALUES",
    "SyntheticFaces",
    "confusable_pairs",
    "region_states",
    "render_face",
    "save_faces",
]

#: Class names in RAF-DB's label order (label ``i`` is ``CLASS_NAMES[i]``).
CLASS_NAMES: tuple[str, ...] = (
    "Surprise",
    "Fear",
    "Disgust",
    "Happiness",
    "Sadness",
    "Anger",
    "Neutral",
)

#: The facial regions an expression is made of, in drawing order.
REGIONS: tuple[str, ...] = ("brows", "eyes", "nose", "mouth")

#: Possible states of each region.
REGION_VALUES: dict[str, tuple[str, ...]] = {
    "brows": ("neutral", "raised", "lowered", "inner_raised"),
    "eyes": ("normal", "wide", "narrow"),
    "nose": ("plain", "wrinkle"),
    "mouth": ("neutral", "open", "smile", "frown"),
}

#: Region states of every class, keyed by class name.
REGION_STATES: dict[str, dict[str, str]] = {
    "Surprise": {"brows": "raised", "eyes": "wide", "nose": "plain", "mouth": "open"},
    "Fear": {"brows": "inner_raised", "eyes": "wide", "nose": "plain", "mouth": "frown"},
    "Disgust": {"brows": "lowered", "eyes": "narrow", "nose": "wrinkle", "mouth": "frown"},
    "Happiness": {"brows": "neutral", "eyes": "normal", "nose": "plain", "mouth": "smile"},
    "Sadness": {"brows": "inner_raised", "eyes": "narrow", "nose": "plain", "mouth": "frown"},
    "Anger": {"brows": "lowered", "eyes": "narrow", "nose": "plain", "mouth": "frown"},
    "Neutral": {"brows": "neutral", "eyes": "normal", "nose": "plain", "mouth": "neutral"},
}

_SPLIT_CODES = {"train": 0, "test": 1}


def _check_label(label: int) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"label: expected an int in [0, {len(CLASS_NAMES)}), got {label!r}")
    if not 0 <= int(label) < len(CLASS_NAMES):
        raise ValueError(f"label: expected an int in [0, {len(CLASS_NAMES)}), got {label}")
    return int(label)


def _check_regions(hidden_regions: Iterable[str]) -> frozenset[str]:
    hidden = frozenset(hidden_regions)
    unknown = sorted(hidden - set(REGIONS))
    if unknown:
        raise ValueError(f"hidden_regions: expected names from {list(REGIONS)}, got {unknown}")
    return hidden


def region_states(label: int) -> dict[str, str]:
    """The state of every region for a class.

    Args:
        label: Class index in ``[0, 7)`` (RAF-DB order).

    Returns:
        A new dict ``{region: state}`` for all of :data:`REGIONS`.

    Raises:
        ValueError: If ``label`` is not a valid class index.
    """
    return dict(REGION_STATES[CLASS_NAMES[_check_label(label)]])


def confusable_pairs(*hidden_regions: str) -> list[tuple[int, int]]:
    """Pairs of classes whose region states agree everywhere except in ``hidden_regions``.

    With those regions hidden, the two classes of every returned pair are rendered
    identically from the same random state, hence are identical in distribution.

    Args:
        *hidden_regions: Names from :data:`REGIONS`.

    Returns:
        Sorted list of label pairs ``(i, j)`` with ``i < j``.

    Raises:
        ValueError: On an unknown region name.
    """
    hidden = _check_regions(hidden_regions)
    visible = [r for r in REGIONS if r not in hidden]
    out = []
    for i in range(len(CLASS_NAMES)):
        for j in range(i + 1, len(CLASS_NAMES)):
            si, sj = REGION_STATES[CLASS_NAMES[i]], REGION_STATES[CLASS_NAMES[j]]
            if all(si[r] == sj[r] for r in visible):
                out.append((i, j))
    return out


def render_face(
    label: int,
    rng: np.random.Generator | int | None = None,
    size: int = 224,
    hidden_regions: Iterable[str] = (),
) -> np.ndarray:
    """Render one face of class ``label``.

    Every nuisance parameter is drawn from ``rng`` in a fixed order that depends on
    neither ``label`` nor ``hidden_regions``; hence two calls with generators in the
    same state produce images that differ only where the classes' region states
    differ (and not at all if those regions are hidden).

    Args:
        label: Class index in ``[0, 7)``, RAF-DB order (:data:`CLASS_NAMES`).
        rng: A ``numpy.random.Generator`` (advanced in place), an int seed, or
            ``None`` for fresh entropy.
        size: Output height and width in pixels (>= 16).
        hidden_regions: Regions (names from :data:`REGIONS`) not drawn; skin shows
            instead. Used to test that no single region decides the class.

    Returns:
        ``uint8`` array of shape ``(size, size, 3)``, RGB.

    Raises:
        ValueError: On a bad label, size or region name.
    """
    label = _check_label(label)
    hidden = _check_regions(hidden_regions)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size: expected an int >= 16, got {size!r}")
    size = int(size)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    look = face_drawing.draw_look(rng, size)  # every random draw, label-independent order
    return face_drawing.paint_face(look, REGION_STATES[CLASS_NAMES[label]], hidden)


class SyntheticFaces(Dataset):
    """Balanced dataset of :func:`render_face` images, generated on the fly.

    Sample ``i`` is a pure function of ``(seed, split, i)`` (and of ``size`` and
    ``hidden_regions``): the label comes from a permutation fixed by ``(seed,
    split)`` over ``i % 7``, so every class has ``num_samples // 7`` or one more
    samples; the image is rendered from a generator seeded with ``(seed, split, i)``.
    ``train`` and ``test`` use disjoint seed streams.

    Args:
        num_samples: Number of samples.
        size: Image height and width.
        seed: Base seed.
        split: ``"train"`` or ``"test"``.
        transform: Callable applied to the ``(3, size, size)`` float tensor in
            ``[0, 1]`` (for example ``transforms.build_transforms(...)``); ``None``
            returns that tensor as is.
        hidden_regions: Regions not drawn (see :func:`render_face`).

    Attributes:
        classes: :data:`CLASS_NAMES` as a list.
        targets: Label of every sample, a list of ints.

    Raises:
        ValueError: On a bad ``split``, ``num_samples``, ``size`` or region name.
    """

    def __init__(
        self,
        num_samples: int = 7000,
        size: int = 224,
        seed: int = 0,
        split: str = "train",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        hidden_regions: Iterable[str] = (),
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split: expected one of {sorted(_SPLIT_CODES)}, got {split!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ValueError(f"size: expected an int >= 16, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.num_samples = num_samples
        self.size = size
        self.seed = seed
        self.split = split
        self.transform = transform
        self.hidden_regions = tuple(sorted(_check_regions(hidden_regions)))
        self.classes: list[str] = list(CLASS_NAMES)
        code = _SPLIT_CODES[split]
        order = np.random.default_rng([seed, code, 0x5EED]).permutation(num_samples)
        self.targets: list[int] = [int(v) % len(CLASS_NAMES) for v in order]

    def __len__(self) -> int:
        return self.num_samples

    def render(self, index: int) -> np.ndarray:
        """The uint8 ``(size, size, 3)`` image of sample ``index``, without the transform."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        return render_face(self.targets[index], rng, self.size, self.hidden_regions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.render(index)).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index % self.num_samples]

    def extra_repr(self) -> str:
        """Short description used by ``repr``."""
        return (
            f"num_samples={self.num_samples}, size={self.size}, seed={self.seed}, "
            f"split={self.split!r}, hidden_regions={self.hidden_regions}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def save_faces(
    out_dir: str | Path, *, per_class: int = 1, size: int = 112, seed: int = 0, split: str = "test"
) -> list[Path]:
    """Write faces of ``SyntheticFaces(split=split, seed=seed)`` as PNG files, ``per_class`` of each class.

    The faces come from the split's own seed stream (``"test"`` faces are never
    among the training faces of a run with the same seed). Files are named
    ``<split>_<index>_<class>.png`` and never overwritten: if any of them exists,
    nothing is written.

    Returns:
        The paths written, class by class.

    Raises:
        FileExistsError: A file of that name is already there.
    """
    from PIL import Image

    faces = SyntheticFaces(num_samples=max(7 * per_class * 4, 70), size=size, seed=seed, split=split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [
        (index, out / f"{split}_{index}_{name}.png")
        for label, name in enumerate(CLASS_NAMES)
        for index in [i for i, t in enumerate(faces.targets) if t == label][:per_class]
    ]
    for _, path in chosen:
        if path.exists():
            raise FileExistsError(f"{path}: already there (remove it or choose another folder)")
    for index, path in chosen:
        Image.fromarray(faces.render(index)).save(path)
    return [path for _, path in chosen]


def _main(args: Sequence[str] | None = None) -> None:
    """``python -m dan_recipe.synthetic_faces OUT_DIR [SIZE]``: a user's mistake is one line."""
    import sys

    from .errors import UserError

    argv = list(sys.argv[1:] if args is None else args)
    if len(argv) not in (1, 2) or (len(argv) == 2 and not argv[1].isdigit()):
        raise UserError(f"usage: python -m dan_recipe.synthetic_faces OUT_DIR [SIZE], got {' '.join(argv)!r}")
    try:
        paths = save_faces(argv[0], size=int(argv[1]) if len(argv) == 2 else 112)
    except (ValueError, FileExistsError) as exc:
        raise UserError(str(exc)) from None
    for path in paths:
        print(path)


if __name__ == "__main__":
    import sys

    from .errors import run_command

    sys.exit(run_command(_main))
