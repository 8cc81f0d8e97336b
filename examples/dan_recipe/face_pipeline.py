"""From pictures to face crops, and from face crops to batches, keeping every picture in order.

* :func:`find_faces` runs the detector on each :class:`~dan_recipe.sources.Picture`
  (or, with no detector, takes the whole picture as one face) and cuts the crops.
* :func:`group_for_batches` gathers consecutive pictures until they hold at least
  ``batch_size`` faces (or are ``batch_size`` pictures), so that faces of small
  pictures share forward passes and results still come out picture by picture, in
  input order (a picture without a face travels in its group too, and gets its
  record in its place).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .faces import DEFAULT_MARGIN, Box, FaceDetector, crop_face, whole_picture_box
from .sources import Picture

__all__ = ["FacesInPicture", "find_faces", "group_for_batches"]


@dataclass
class FacesInPicture:
    """A picture, its face boxes and their crops (same order).

    Attributes:
        picture: The image or frame.
        boxes: Detected boxes (or the whole picture), sorted left to right.
        crops: ``uint8`` RGB crop of every box.
    """

    picture: Picture
    boxes: list[Box] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)


def find_faces(
    pictures: Iterable[Picture], detector: FaceDetector | None, margin: float = DEFAULT_MARGIN
) -> Iterator[FacesInPicture]:
    """The faces of every picture.

    Args:
        pictures: Images and frames.
        detector: The face detector; ``None`` takes each whole picture as one face
            crop (``--no-detect``: the pictures are face crops already), without margin.
        margin: Margin of the crops around detected boxes (see
            :func:`dan_recipe.faces.crop_face`).
    """
    for picture in pictures:
        if detector is None:
            yield FacesInPicture(picture, [whole_picture_box(picture.rgb)], [picture.rgb])
            continue
        boxes = detector(picture.rgb)
        yield FacesInPicture(picture, boxes, [crop_face(picture.rgb, box, margin) for box in boxes])


def group_for_batches(items: Iterable[FacesInPicture], batch_size: int) -> Iterator[list[FacesInPicture]]:
    """Consecutive pictures, grouped until a group holds ``batch_size`` faces (or pictures) or more.

    The last group may hold fewer. The bound on pictures keeps memory bounded where
    pictures have no faces (a long video of an empty room). A group's faces, in order, are its pictures'
    faces one picture after the other.

    Args:
        items: From :func:`find_faces`.
        batch_size: Faces per forward pass (>= 1).

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    group: list[FacesInPicture] = []
    faces = 0
    for item in items:
        group.append(item)
        faces += len(item.crops)
        if faces >= batch_size or len(group) >= batch_size:  # bounded memory on faceless videos
            yield group
            group, faces = [], 0
    if group:
        yield group
