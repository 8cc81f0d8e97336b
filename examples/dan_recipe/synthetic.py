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

As a command, it writes class-folder trees of faces to train on, or to try
``predict.py`` and ``explain.py`` on::

    python -m dan_recipe.synthetic faces/ --train 200 --val 40 --test 40 --size 64
    # faces/train/<class>/train_00012.png ..., faces/val/..., faces/test/...

Example:
    >>> from dan_recipe import synthetic as sf
    >>> img = sf.render_face(0, 123, size=64)
    >>> img.shape, img.dtype.name
    ((64, 64, 3), 'uint8')
    >>> sf.confusable_pairs("nose")
    [(2, 5)]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CLASS_NAMES",
    "REGIONS",
    "REGION_STATES",
    "REGION_VALUES",
    "SyntheticFaces",
    "confusable_pairs",
    "main",
    "region_states",
    "render_face",
    "write_face_tree",
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

_SPLIT_CODES = {"train": 0, "test": 1, "val": 2}


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
    look = draw_look(rng, size)  # every random draw, label-independent order
    return paint_face(look, REGION_STATES[CLASS_NAMES[label]], hidden)


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


# --------------------------------------------------------------------------------------
# Rendering. Coordinates: the face's own frame, x to the right, y downwards, the head
# roughly in [-0.75, 0.75] x [-0.95, 0.95]. Shapes are signed distances (negative
# inside) in those units, turned into anti-aliased coverage; each shape is evaluated
# only on the pixel window that its bounding box covers.
# --------------------------------------------------------------------------------------

_WHITE = np.array([0.97, 0.97, 0.95], dtype=np.float32)
_BLACK = np.zeros(3, dtype=np.float32)
_MOUTH_IN = np.array([0.18, 0.04, 0.05], dtype=np.float32)

#: (low, high) of every uniform nuisance draw of render_face, in drawing order.
# fmt: off
_RANGES: tuple[tuple[float, float], ...] = (
    (-15.0, 15.0),  # angle (degrees)
    (0.80, 1.0),  # scale
    (-0.08, 0.08), (-0.08, 0.08),  # shift x, y
    (0.60, 0.70), (0.80, 0.90),  # face radii
    (0.0, 1.0),  # skin tone
    (0.93, 1.07), (0.93, 1.07), (0.93, 1.07),  # skin colour jitter
    (0.02, 0.45), (0.6, 1.0), (0.6, 1.0), (0.6, 1.0),  # hair brightness, colour
    (-0.86, -0.66), (0.03, 0.12),  # hairline, hair volume
    (0.03, 0.18), (0.03, 0.18), (0.03, 0.18),  # ink colour
    (0.05, 0.45), (0.05, 0.45), (0.05, 0.45),  # iris colour
    (0.7, 1.1), (0.7, 1.1), (0.7, 1.1),  # lip colour jitter
    (0.27, 0.33), (-0.16, -0.10), (0.16, 0.20),  # eye dx, y, half width
    (-0.03, 0.03), (-0.03, 0.03),  # gaze
    (0.055, 0.075), (0.20, 0.26), (0.15, 0.20),  # brow width, length, gap
    (0.26, 0.34),  # nose length
    (0.48, 0.55), (0.21, 0.28),  # mouth y, half width
    (0.035, 0.05),  # line width
    (0.05, 0.95), (0.05, 0.95), (0.05, 0.95),  # background colour
    *((-0.25, 0.25),) * 6,  # background gradient
    (0.0, 2.0 * math.pi), (0.0, 0.30),  # light direction, amplitude
    (0.0, 1.0),  # occluder kind
    (-0.6, 0.6), (-0.6, 0.6), (0.0, math.pi),  # occluder position, angle
    (0.4, 0.9), (0.07, 0.16),  # occluder length, thickness
    (0.0, 1.0), (0.0, 1.0), (0.0, 1.0),  # occluder colour
    (0.0, 0.05),  # noise sigma
)
# fmt: on
_LO = np.array([r[0] for r in _RANGES])
_SPAN = np.array([r[1] - r[0] for r in _RANGES])
_LIGHT, _DARK, _LIP = (0.96, 0.80, 0.68), (0.42, 0.27, 0.18), (0.62, 0.22, 0.22)


@lru_cache(maxsize=16)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    gy, gx = np.meshgrid(c, c, indexing="ij")
    gx.setflags(write=False)
    gy.setflags(write=False)
    return gx, gy


@lru_cache(maxsize=16)
def _upsample_matrix(size: int, coarse: int) -> np.ndarray:
    """Bilinear interpolation weights ``(size, coarse)`` from ``coarse`` knots to pixels."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) / size * (coarse - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, coarse - 2)
    frac = pos - lo
    m = np.zeros((size, coarse), dtype=np.float32)
    m[np.arange(size), lo] = 1.0 - frac
    m[np.arange(size), lo + 1] = frac
    m.setflags(write=False)
    return m


def _sd_ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return (np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1.0) * min(rx, ry)


def _sd_capsule(
    x: np.ndarray, y: np.ndarray, ax: float, ay: float, bx: float, by: float, r: float
) -> np.ndarray:
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.hypot(x - ax - t * dx, y - ay - t * dy) - r


def _sd_arc(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, half_w: float, bend: float, r: float
) -> np.ndarray:
    """Thick arc ``y = cy + bend * ((x - cx) / half_w) ** 2`` for ``|x - cx| <= half_w``."""
    u = np.clip((x - cx) / half_w, -1.0, 1.0)
    slope = (2.0 * bend / half_w) * u
    inside = np.abs(y - cy - bend * u * u) / np.sqrt(1.0 + slope * slope)
    end = np.hypot(x - cx - u * half_w, y - cy - bend)  # beyond the ends: to the end points
    return np.where(np.abs(u) < 1.0, inside, end) - r


_SHAPES: dict[str, Callable[..., np.ndarray]] = {
    "ellipse": _sd_ellipse,
    "capsule": _sd_capsule,
    "arc": _sd_arc,
}


def _bbox(kind: str, a: tuple[float, ...]) -> tuple[float, float, float, float]:
    if kind == "ellipse":
        cx, cy, rx, ry = a
        return cx - rx, cy - ry, cx + rx, cy + ry
    if kind == "capsule":
        ax, ay, bx, by, r = a
        return min(ax, bx) - r, min(ay, by) - r, max(ax, bx) + r, max(ay, by) + r
    cx, cy, hw, bend, r = a  # arc
    return cx - hw - r, cy + min(bend, 0.0) - r, cx + hw + r, cy + max(bend, 0.0) + r


class _Canvas:
    """A float image plus the map from its pixels to the face frame."""

    def __init__(self, img: np.ndarray, angle: float, scale: float, shift: np.ndarray) -> None:
        self.img = img
        self.size = img.shape[0]
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.scale = scale
        self.shift = (float(shift[0]), float(shift[1]))
        gx, gy = _pixel_grid(self.size)
        self.gx, self.gy = gx, gy
        self.x, self.y = self.to_face(gx, gy)
        self.aa = 2.0 / (self.size * scale)  # one pixel in face units

    def to_face(self, gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        px, py = gx - self.shift[0], gy - self.shift[1]
        return (self.cos * px + self.sin * py) / self.scale, (self.cos * py - self.sin * px) / self.scale

    def window(self, box: tuple[float, float, float, float], grow: float) -> tuple[slice, slice]:
        """Pixel rows and columns covering a face-frame box (grown by ``grow``)."""
        x0, y0, x1, y1 = box[0] - grow, box[1] - grow, box[2] + grow, box[3] + grow
        c, s, k = self.cos * self.scale, self.sin * self.scale, self.size / 2.0
        gxs = [c * x - s * y for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
        gys = [s * x + c * y for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
        n = self.size
        c0 = max(int((min(gxs) + self.shift[0] + 1.0) * k) - 2, 0)
        c1 = min(int((max(gxs) + self.shift[0] + 1.0) * k) + 3, n)
        r0 = max(int((min(gys) + self.shift[1] + 1.0) * k) - 2, 0)
        r1 = min(int((max(gys) + self.shift[1] + 1.0) * k) + 3, n)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def coverage(self, kind: str, args: tuple[float, ...], grow: float, win: tuple[slice, slice]) -> np.ndarray:
        sd = _SHAPES[kind](self.x[win], self.y[win], *args)
        sd *= -1.0 / self.aa
        sd += 0.5 + grow / self.aa
        return np.clip(sd, 0.0, 1.0, out=sd)

    def fill(
        self,
        kind: str,
        args: tuple[float, ...],
        color: np.ndarray,
        grow: float = 0.0,
        clip: tuple[str, tuple[float, ...]] | None = None,
    ) -> None:
        """Paint a shape (grown by ``grow``), optionally only inside another shape."""
        win = self.window(_bbox(kind, args), grow)
        if win[0].start == win[0].stop or win[1].start == win[1].stop:
            return
        a = self.coverage(kind, args, grow, win)
        if clip is not None:
            a *= self.coverage(clip[0], clip[1], 0.0, win)
        _paint(self.img[win], a, color)


def _paint(img: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> None:
    img += alpha[..., None] * (color - img)


def _f32(v: Any) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


@dataclass(frozen=True)
class FaceLook:
    """The nuisance parameters of one face (everything but its expression).

    Lengths are in face units (see the comment above :data:`_RANGES`), colours RGB in
    ``[0, 1]``; ``bg_tex`` is the coarse background texture and ``noise`` the
    per-pixel Gaussian noise of a ``size x size`` image.
    """

    size: int
    angle: float
    scale: float
    shift: tuple[float, float]
    face_rx: float
    face_ry: float
    skin: np.ndarray
    hair: np.ndarray
    hairline: float
    hair_volume: float
    ink: np.ndarray
    iris: np.ndarray
    lip: np.ndarray
    eye_dx: float
    eye_y: float
    eye_w: float
    gaze: tuple[float, float]
    brow_w: float
    brow_len: float
    brow_gap: float
    nose_len: float
    mouth_y: float
    mouth_w: float
    line_w: float
    bg: np.ndarray
    bg_grad: np.ndarray
    light_dir: float
    light_amp: float
    occ_kind: float
    occ_xy: tuple[float, float]
    occ_angle: float
    occ_len: float
    occ_thick: float
    occ_color: np.ndarray
    noise_sigma: float
    bg_tex: np.ndarray
    noise: np.ndarray


def draw_look(rng: np.random.Generator, size: int) -> FaceLook:
    """Every random draw of a face, in a fixed order that depends on nothing but ``rng``.

    Args:
        rng: Generator, advanced in place.
        size: Image height and width in pixels.

    Returns:
        The face's nuisance parameters.
    """
    u = iter((_LO + _SPAN * rng.random(_LO.shape[0])).tolist())
    angle, scale = math.radians(next(u)), next(u)
    shift = (next(u), next(u))
    face_rx, face_ry = next(u), next(u)
    tone = next(u)
    tone_jit = (next(u), next(u), next(u))
    skin = _f32([(lo * (1 - tone) + hi * tone) * j for lo, hi, j in zip(_LIGHT, _DARK, tone_jit, strict=True)])
    hair_v = next(u)
    hair = _f32([hair_v * next(u) for _ in range(3)])
    hairline, hair_volume = next(u), next(u)
    ink = _f32([next(u) for _ in range(3)])  # brows and lines
    iris = _f32([next(u) for _ in range(3)])
    lip = _f32([c * next(u) for c in _LIP])
    eye_dx, eye_y, eye_w = next(u), next(u), next(u)
    gaze = (next(u), next(u))
    brow_w, brow_len, brow_gap = next(u), next(u), next(u)
    nose_len = next(u)
    mouth_y, mouth_w = next(u), next(u)
    line_w = next(u)
    bg = _f32([next(u) for _ in range(3)])
    bg_grad = _f32([next(u) for _ in range(6)]).reshape(2, 3)
    light_dir, light_amp = next(u), next(u)
    occ_kind = next(u)  # < 0.15 bar, < 0.30 blob, else none
    occ_xy = (next(u), next(u))
    occ_angle = next(u)
    occ_len, occ_thick = next(u), next(u)
    occ_color = _f32([next(u) for _ in range(3)])
    noise_sigma = next(u)
    bg_tex = rng.uniform(-0.15, 0.15, size=(5, 15)).astype(np.float32)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)
    return FaceLook(
        size,
        angle,
        scale,
        shift,
        face_rx,
        face_ry,
        skin,
        hair,
        hairline,
        hair_volume,
        ink,
        iris,
        lip,
        eye_dx,
        eye_y,
        eye_w,
        gaze,
        brow_w,
        brow_len,
        brow_gap,
        nose_len,
        mouth_y,
        mouth_w,
        line_w,
        bg,
        bg_grad,
        light_dir,
        light_amp,
        occ_kind,
        occ_xy,
        occ_angle,
        occ_len,
        occ_thick,
        occ_color,
        noise_sigma,
        bg_tex,
        noise,
    )


def _background(look: FaceLook) -> _Canvas:
    """Colour, gradient and low-frequency texture, on a new canvas."""
    size = look.size
    gx, gy = _pixel_grid(size)
    up = _upsample_matrix(size, 5)
    rows = (up @ look.bg_tex).reshape(size, 5, 3)
    img = np.matmul(up, rows)  # (size, size, 3): texture[h, w] = sum_kl up[h,k] G[k,l] up[w,l]
    img += look.bg
    img += gx[..., None] * look.bg_grad[0]
    img += gy[..., None] * look.bg_grad[1]
    return _Canvas(img, look.angle, look.scale, look.shift)


def _head(cv: _Canvas, look: FaceLook) -> None:
    rx, ry = look.face_rx, look.face_ry
    cv.fill("ellipse", (0.0, -0.04, rx + look.hair_volume, ry + look.hair_volume), look.hair)
    cv.fill("ellipse", (0.0, 0.0, rx, ry), look.skin)
    win = cv.window((-rx, -ry, rx, look.hairline + 0.15 * rx**2), 0.0)
    fx, fy = cv.x[win], cv.y[win]
    fringe = np.clip(0.5 - (fy - look.hairline + 0.15 * fx * fx) / cv.aa, 0.0, 1.0)
    fringe *= cv.coverage("ellipse", (0.0, 0.0, rx, ry), 0.0, win)
    _paint(cv.img[win], fringe, look.hair)


def _eyes(cv: _Canvas, look: FaceLook, state: str) -> None:
    eh = {"wide": 0.15, "normal": 0.085, "narrow": 0.03}[state]
    ey, ew = look.eye_y, look.eye_w
    gaze_x, gaze_y = look.gaze
    for sx in (-1.0, 1.0):
        cx = sx * look.eye_dx
        if state == "narrow":
            cv.fill("capsule", (cx - ew, ey, cx + ew, ey, 0.032), look.ink)
            continue
        eye = ("ellipse", (cx, ey, ew, eh))
        cv.fill(*eye, look.ink, grow=look.line_w * 0.9)  # outline
        cv.fill(*eye, _WHITE)
        iris_r = min(0.075, eh + 0.01)
        cv.fill("ellipse", (cx + gaze_x, ey + gaze_y, iris_r, iris_r), look.iris, clip=eye)
        cv.fill("ellipse", (cx + gaze_x, ey + gaze_y, 0.032, 0.032), _BLACK, clip=eye)


def _brows(cv: _Canvas, look: FaceLook, state: str) -> None:
    """Both brows; the inner end is the one towards the nose."""
    by = look.eye_y - look.brow_gap - 0.05
    inner_dy, outer_dy = {
        "neutral": (0.0, 0.0),
        "raised": (-0.12, -0.12),
        "lowered": (0.11, -0.02),
        "inner_raised": (-0.12, 0.05),
    }[state]
    ex, brow_len = look.eye_dx, look.brow_len
    for sx in (-1.0, 1.0):
        inner_x, outer_x = sx * (ex - brow_len + 0.06), sx * (ex + brow_len * 0.95)
        cv.fill("capsule", (inner_x, by + inner_dy, outer_x, by + outer_dy, look.brow_w / 2 + 0.01), look.ink)


def _nose(cv: _Canvas, look: FaceLook, wrinkle: bool) -> None:
    """The nose is always drawn; the wrinkle is the region's cue."""
    top = look.eye_y + 0.04
    shade = look.skin * np.float32(0.62)
    lw, nose_len = look.line_w, look.nose_len
    cv.fill("capsule", (0.015, top + 0.05, 0.035, top + nose_len, lw * 0.6), shade)
    cv.fill("capsule", (-0.08, top + nose_len + 0.01, 0.08, top + nose_len + 0.01, lw * 0.7), shade)
    if wrinkle:
        for k in range(3):
            wy = top + 0.03 + 0.075 * k
            for sx in (-1.0, 1.0):  # chevrons across the bridge
                cv.fill("capsule", (0.0, wy + 0.03, sx * 0.13, wy - 0.01, 0.022), look.ink)


def _mouth(cv: _Canvas, look: FaceLook, state: str) -> None:
    my, mw, lw = look.mouth_y, look.mouth_w, look.line_w
    lip = look.lip
    if state == "neutral":
        cv.fill("capsule", (-mw, my, mw, my, lw), lip * np.float32(0.8))
    elif state == "open":
        mouth = ("ellipse", (0.0, my, mw * 0.62, 0.17))
        cv.fill(*mouth, lip, grow=lw)
        cv.fill(*mouth, _MOUTH_IN)
    elif state == "smile":
        hw = mw * 1.1
        cv.fill("arc", (0.0, my + 0.07, hw, -0.15, lw * 1.1), lip * np.float32(0.8))
        for sx in (-1.0, 1.0):  # raised cheeks: creases beside the smile
            cv.fill(
                "capsule",
                (sx * (hw + 0.06), my - 0.20, sx * (hw + 0.11), my - 0.04, 0.022),
                look.skin * np.float32(0.6),
            )
    else:  # frown
        cv.fill("arc", (0.0, my - 0.04, mw, 0.13, lw * 1.1), lip * np.float32(0.8))


def _lighting_occluder_noise(img: np.ndarray, look: FaceLook) -> np.ndarray:
    """Lighting gradient, the optional occluder (in the image frame), noise; to uint8."""
    gx, gy = _pixel_grid(look.size)
    img *= (1.0 + look.light_amp * (math.cos(look.light_dir) * gx + math.sin(look.light_dir) * gy))[..., None]
    if look.occ_kind < 0.30:
        occ_x, occ_y = look.occ_xy
        if look.occ_kind < 0.15:
            hl = look.occ_len / 2
            dx, dy = math.cos(look.occ_angle) * hl, math.sin(look.occ_angle) * hl
            thick = look.occ_thick * look.scale
            occ = _sd_capsule(gx, gy, occ_x - dx, occ_y - dy, occ_x + dx, occ_y + dy, thick)
        else:
            r = (look.occ_thick + 0.08) * look.scale
            occ = _sd_ellipse(gx, gy, occ_x, occ_y, r, r * 0.8)
        _paint(img, np.clip(0.5 - occ * (look.size / 2.0), 0.0, 1.0), look.occ_color)
    noise = look.noise * np.float32(look.noise_sigma * 255.0)
    img *= np.float32(255.0)
    img += noise
    img += np.float32(0.5)
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


def paint_face(look: FaceLook, states: Mapping[str, str], hidden: frozenset[str]) -> np.ndarray:
    """Draw a face: background, head and hair, then every region not in ``hidden``.

    Args:
        look: Nuisance parameters from :func:`draw_look`.
        states: State of every region (``{"brows": "raised", ...}``).
        hidden: Regions not drawn (skin shows instead; the nose keeps its plain form).

    Returns:
        ``uint8`` array ``(size, size, 3)``, RGB.
    """
    cv = _background(look)
    _head(cv, look)
    if "eyes" not in hidden:
        _eyes(cv, look, states["eyes"])
    if "brows" not in hidden:
        _brows(cv, look, states["brows"])
    _nose(cv, look, wrinkle="nose" not in hidden and states["nose"] == "wrinkle")
    if "mouth" not in hidden:
        _mouth(cv, look, states["mouth"])
    return _lighting_occluder_noise(cv.img, look)


# --------------------------------------------------------------------------------------
# Faces as files: a class-folder tree, and its command
# --------------------------------------------------------------------------------------


def write_face_tree(
    out_dir: str | Path, per_class: Mapping[str, int], *, size: int = 112, seed: int = 0
) -> dict[str, int]:
    """Write faces as PNG files in a class-folder tree: ``out_dir/<split>/<class>/<split>_<index>.png``.

    Each split draws from its own seed stream (:class:`SyntheticFaces`), so a test
    face is never a training face. Nothing is overwritten: every file name is
    checked before the first is written.

    Args:
        out_dir: The tree's root.
        per_class: Faces per class of each split, e.g. ``{"train": 200, "test": 40}``
            (a split with 0 is not written).
        size: Image side in pixels (>= 16).
        seed: Base seed of the faces.

    Returns:
        Files written per split.

    Raises:
        ValueError: An unknown split, a negative count, or no face to write.
        FileExistsError: A file of the tree is already there.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_face_tree(tmp, {"train": 2, "test": 1}, size=32)
        {'train': 14, 'test': 7}
    """
    for split, n in per_class.items():
        if split not in _SPLIT_CODES:
            raise ValueError(f"split: expected one of {sorted(_SPLIT_CODES)}, got {split!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"faces per class of {split}: expected an int >= 0, got {n!r}")
    if not any(per_class.values()):
        raise ValueError("expected at least one face to write, got 0 for every split")
    root = Path(out_dir)
    plan: list[tuple[SyntheticFaces, int, Path]] = []
    for split, n in per_class.items():
        if not n:
            continue
        faces = SyntheticFaces(num_samples=n * len(CLASS_NAMES), size=size, seed=seed, split=split)
        plan += [
            (faces, i, root / split / CLASS_NAMES[label] / f"{split}_{i:05d}.png")
            for i, label in enumerate(faces.targets)
        ]
    taken = [path for _, _, path in plan if path.exists()]
    if taken:
        raise FileExistsError(
            f"{taken[0]} is already there ({len(taken)} of the files are): choose another folder"
        )
    from PIL import Image

    for faces, i, path in plan:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(faces.render(i)).save(path)
    return {split: n * len(CLASS_NAMES) for split, n in per_class.items() if n}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{message} (see {self.prog} --help)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dan_recipe.synthetic OUT [--train N] [--val N] [--test N] [--size PX] [--seed S]``.

    Returns:
        The exit status: 0, or 1 after one ``error: ...`` line for a mistake.
    """
    p = _Parser(
        prog="python -m dan_recipe.synthetic",
        description="Write synthetic faces (7 expressions, RAF-DB's class names) as a class-folder tree: "
        "OUT/<split>/<class>/<split>_<index>.png, for train_dan.py --data-root OUT or predict.py / explain.py.",
    )
    p.add_argument("out", metavar="OUT", help="folder of the tree (files already there are never replaced)")
    p.add_argument("--train", type=int, default=100, metavar="N", help="training faces per class (default 100)")
    p.add_argument("--val", type=int, default=20, metavar="N", help="validation faces per class (default 20)")
    p.add_argument("--test", type=int, default=20, metavar="N", help="test faces per class (default 20)")
    p.add_argument("--size", type=int, default=112, metavar="PX", help="image side in pixels (default 112)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    try:
        args = p.parse_args(argv)
        counts = {"train": args.train, "val": args.val, "test": args.test}
        if args.size < 16:
            raise ValueError(f"--size {args.size}: expected >= 16 pixels")
        if args.seed < 0:
            raise ValueError(f"--seed {args.seed}: expected an int >= 0")
        for split, n in counts.items():
            if n < 0:
                raise ValueError(f"--{split} {n}: expected an int >= 0 (faces per class)")
        written = write_face_tree(args.out, counts, size=args.size, seed=args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for split, n in written.items():
        print(f"{Path(args.out) / split}: {n} faces ({n // len(CLASS_NAMES)} per class), {args.size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
