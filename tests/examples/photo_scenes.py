"""The test pictures and the test video of the photo commands, shared by the tests and benchmarks/predict.py.

Everything is built from sample data that ships inside the packages (no download):

* :func:`astronaut` (scikit-image, 512 x 512, one frontal face at about
  ``(177, 66, 95, 95)``) and :func:`grace_hopper` (matplotlib, 512 x 600, one face at
  about ``(155, 105, 222, 222)``);
* :func:`both_1080p`: both portraits enlarged side by side on a light grey
  1920 x 1080 picture, two faces (:data:`BOTH_1080P_FACES`);
* :func:`moving_portrait`: the test video, 60 frames of 640 x 480. The astronaut's
  head and shoulders (rows 0-320, columns 60-380 of her portrait, 240 px wide) move
  left to right over a mid-grey backdrop, up and down once. The crop's right edge
  cuts through the patch beside her face that OpenCV's cascade takes for a face:
  at OpenCV's full scan and 5 neighbours, 37 of the 60 frames of the ``.avi`` get a
  second box there (the issue's video: 23). :func:`moving_portrait_face` says where
  her face is in each frame. :func:`write_video` writes frames as an MJPG ``.avi``.

Only numpy, Pillow, OpenCV, scikit-image and matplotlib are imported (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "ASTRONAUT_FACE",
    "BOTH_1080P_FACES",
    "GRACE_HOPPER_FACE",
    "MOVING_PORTRAIT_FRAMES",
    "astronaut",
    "both_1080p",
    "grace_hopper",
    "moving_portrait",
    "moving_portrait_face",
    "resize",
    "write_video",
]

#: Where OpenCV's full scan finds the astronaut's face (x, y, w, h), within a few pixels.
ASTRONAUT_FACE = (177, 66, 95, 95)
#: Where it finds Grace Hopper's.
GRACE_HOPPER_FACE = (155, 105, 222, 222)
#: The two faces of :func:`both_1080p`, as OpenCV's full scan finds them.
BOTH_1080P_FACES = ((351, 207, 168, 168), (1244, 189, 405, 405))
#: Frames of the test video.
MOVING_PORTRAIT_FRAMES = 60

_PORTRAIT_CROP = (slice(0, 320), slice(60, 380))  # rows, columns of the astronaut's portrait
_PORTRAIT_SIDE = 240
_VIDEO_SIZE = (640, 480)
_BACKDROP = 128


def astronaut() -> np.ndarray:
    """scikit-image's astronaut, ``(512, 512, 3)`` ``uint8`` RGB."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def grace_hopper() -> np.ndarray:
    """matplotlib's Grace Hopper, ``(600, 512, 3)`` ``uint8`` RGB."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as stream, Image.open(stream) as picture:
        return np.asarray(picture.convert("RGB")).copy()


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """``rgb`` resized to ``width`` x ``height`` (Lanczos)."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS))


def both_1080p() -> np.ndarray:
    """Both portraits, 900 px wide, side by side on light grey: ``(1080, 1920, 3)``, two faces."""
    out = np.full((1080, 1920, 3), 200, np.uint8)
    out[90:990, 40:940] = resize(astronaut(), 900, 900)
    out[12:1067, 980:1880] = resize(grace_hopper(), 900, 1055)
    return out


def _portrait_place(index: int, frames: int) -> tuple[int, int]:
    width, height = _VIDEO_SIZE
    t = index / max(1, frames - 1)
    x = round(20 + t * (width - _PORTRAIT_SIDE - 40))
    y = round((height - _PORTRAIT_SIDE) / 2 + (height - _PORTRAIT_SIDE - 40) / 2 * math.sin(2 * math.pi * t))
    return x, y


def moving_portrait(frames: int = MOVING_PORTRAIT_FRAMES) -> list[np.ndarray]:
    """The test video's frames, ``(480, 640, 3)`` ``uint8`` RGB each."""
    rows, cols = _PORTRAIT_CROP
    portrait = resize(astronaut()[rows, cols], _PORTRAIT_SIDE, _PORTRAIT_SIDE)
    width, height = _VIDEO_SIZE
    out = []
    for index in range(frames):
        x, y = _portrait_place(index, frames)
        frame = np.full((height, width, 3), _BACKDROP, np.uint8)
        frame[y : y + _PORTRAIT_SIDE, x : x + _PORTRAIT_SIDE] = portrait
        out.append(frame)
    return out


def moving_portrait_face(index: int, frames: int = MOVING_PORTRAIT_FRAMES) -> tuple[float, float, float]:
    """``(x, y, side)`` of the astronaut's face in frame ``index`` (her face box, scaled and moved)."""
    rows, cols = _PORTRAIT_CROP
    scale = _PORTRAIT_SIDE / (cols.stop - cols.start)
    x, y = _portrait_place(index, frames)
    fx, fy, fw, _ = ASTRONAUT_FACE
    return x + (fx - cols.start) * scale, y + (fy - rows.start) * scale, fw * scale


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float = 10.0) -> Path:
    """An MJPG ``.avi`` of RGB ``frames`` (all the same size): the codec every OpenCV wheel writes and reads."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write MJPG")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path
