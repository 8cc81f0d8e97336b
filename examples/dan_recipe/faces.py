"""Faces in pictures: OpenCV's Haar frontal-face cascade (as the authors' demo), and square crops.

* :class:`FaceDetector` finds every frontal face of an RGB picture at least
  ``min_face`` pixels wide, as :class:`Box` es sorted left to right.
* :func:`crop_face` cuts a square around a box with a margin on every side (the
  training faces of RAF-DB and AffectNet show the whole face, chin and some hair,
  where a Haar box stops at the eyebrows and the mouth); where the square leaves
  the picture, the picture's border pixels are repeated.
* :func:`whole_picture_box` is the box of ``--no-detect`` (pictures that are face
  crops already).

The cascade ships inside ``opencv-python-headless`` 4.x (``cv2.data.haarcascades``);
OpenCV 5 removed it, hence the ``<5`` pin of the examples extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import UserError
from .sources import import_cv2

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_MIN_FACE",
    "HAAR_FRONTAL_FACE",
    "Box",
    "FaceDetector",
    "crop_face",
    "whole_picture_box",
]

#: The cascade file of the authors' demo.
HAAR_FRONTAL_FACE = "haarcascade_frontalface_default.xml"
#: Smallest face looked for, in pixels. Below it the cascade's hits on a 512 px
#: portrait are patches of clothing (26-27 px at a scale factor of 1.05), and a face
#: that small holds little expression once upscaled to 224 px.
DEFAULT_MIN_FACE = 32
#: Margin added on each side of a box, as a fraction of its side (crop side = 1.4 x box).
DEFAULT_MARGIN = 0.2


class Box(NamedTuple):
    """A face box in picture pixels: left, top, width, height."""

    x: int
    y: int
    w: int
    h: int


def _positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _load_cascade(name: str) -> Any:
    cv2 = import_cv2()
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder or "") / name
    if folder is None or not path.is_file():
        raise UserError(
            f"OpenCV {cv2.__version__} has no Haar cascade {name}: expected opencv-python-headless>=4.5,<5 "
            "(OpenCV 5 removed the cascades); pip install 'opencv-python-headless>=4.5,<5'"
        )
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise UserError(f"OpenCV cannot load the Haar cascade {path}")
    return cascade


class FaceDetector:
    """OpenCV's Haar frontal-face cascade on RGB pictures.

    Args:
        min_face: Smallest face side looked for, in pixels (>= 1); the cascade's
            own window is 24 px.
        scale_factor: Step between the scales searched (> 1); smaller finds more
            faces, and more false ones, more slowly.
        min_neighbors: Overlapping hits needed to keep a face (>= 0); higher keeps
            fewer, surer faces.
        cascade: File name inside ``cv2.data.haarcascades``.

    Raises:
        ValueError: A parameter out of range.
        UserError: OpenCV or its cascade is missing.

    Example:
        >>> import numpy as np
        >>> FaceDetector()(np.zeros((64, 64, 3), np.uint8))
        []
    """

    def __init__(
        self,
        min_face: int = DEFAULT_MIN_FACE,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        cascade: str = HAAR_FRONTAL_FACE,
    ) -> None:
        self.min_face = _positive_int("min_face", min_face, 1)
        if not isinstance(scale_factor, (int, float)) or isinstance(scale_factor, bool) or scale_factor <= 1:
            raise ValueError(f"scale_factor: expected a number > 1, got {scale_factor!r}")
        self.scale_factor = float(scale_factor)
        self.min_neighbors = _positive_int("min_neighbors", min_neighbors, 0)
        self._cv2 = import_cv2()
        self._cascade = _load_cascade(cascade)

    def __call__(self, rgb: np.ndarray) -> list[Box]:
        """The faces of an ``(H, W, 3)`` ``uint8`` RGB picture, sorted by ``x`` then ``y``."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"picture: expected an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
        gray = self._cv2.cvtColor(rgb, self._cv2.COLOR_RGB2GRAY)
        found = self._cascade.detectMultiScale(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_face, self.min_face),
        )
        boxes = [Box(*(int(v) for v in row)) for row in np.asarray(found).reshape(-1, 4)]
        return sorted(boxes)

    def __repr__(self) -> str:
        return (
            f"FaceDetector(min_face={self.min_face}, scale_factor={self.scale_factor}, "
            f"min_neighbors={self.min_neighbors})"
        )


def whole_picture_box(rgb: np.ndarray) -> Box:
    """The box covering the whole picture (``--no-detect``)."""
    return Box(0, 0, int(rgb.shape[1]), int(rgb.shape[0]))


def crop_face(rgb: np.ndarray, box: Box, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """A square crop centred on ``box``, ``margin`` x its longer side added on every side.

    Where the square reaches past the picture, the picture's edge pixels are
    repeated (no black bars for the model to look at).

    Args:
        rgb: ``(H, W, 3)`` picture.
        box: The face.
        margin: Fraction of the box's longer side added on each side (>= 0).

    Returns:
        ``(S, S, 3)`` ``uint8`` array, ``S = round(max(w, h) * (1 + 2 * margin))``.

    Raises:
        ValueError: A negative margin or an empty box.

    Example:
        >>> import numpy as np
        >>> crop_face(np.zeros((100, 80, 3), np.uint8), Box(60, 10, 20, 20), 0.5).shape
        (40, 40, 3)
    """
    if not margin >= 0:
        raise ValueError(f"margin: expected a number >= 0, got {margin!r}")
    if box.w < 1 or box.h < 1:
        raise ValueError(f"box: expected a positive width and height, got {tuple(box)}")
    side = max(1, round(max(box.w, box.h) * (1 + 2 * margin)))
    left = round(box.x + box.w / 2 - side / 2)
    top = round(box.y + box.h / 2 - side / 2)
    height, width = rgb.shape[:2]
    pad = (
        (max(0, -top), max(0, top + side - height)),
        (max(0, -left), max(0, left + side - width)),
        (0, 0),
    )
    inside = rgb[max(0, top) : min(height, top + side), max(0, left) : min(width, left + side)]
    if any(before or after for before, after in pad):
        inside = np.pad(inside, pad, mode="edge")
    return np.ascontiguousarray(inside)
