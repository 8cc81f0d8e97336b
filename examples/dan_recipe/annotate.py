"""``predict.py --annotate``: a picture with each face's box, label and top probability drawn on it.

Drawn with OpenCV on a copy of the picture: a box per face, and above it (below it
when the box touches the top edge) ``label p`` on a filled strip, sized with the
picture. Written as JPEG (quality 92), whatever the source format.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .faces import Box
from .sources import import_cv2

__all__ = ["ANNOTATION_SUFFIX", "draw_faces", "write_annotated"]

#: File ending of the annotated pictures.
ANNOTATION_SUFFIX = ".jpg"
_BOX_RGB = (40, 220, 90)
_TEXT_RGB = (0, 0, 0)


def draw_faces(rgb: np.ndarray, faces: Sequence[tuple[Box, str, float]]) -> np.ndarray:
    """A copy of ``rgb`` with every face's box and ``label probability`` drawn.

    Args:
        rgb: ``(H, W, 3)`` ``uint8`` picture.
        faces: ``(box, label, probability of the label)`` per face.

    Returns:
        The annotated copy.
    """
    cv2 = import_cv2()
    out = np.ascontiguousarray(rgb.copy())
    height, width = out.shape[:2]
    thickness = max(1, round(min(height, width) / 300))
    scale = max(0.4, min(height, width) / 900)
    for box, label, prob in faces:
        cv2.rectangle(out, (box.x, box.y), (box.x + box.w - 1, box.y + box.h - 1), _BOX_RGB, thickness)
        text = f"{label} {prob:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = box.y - th - base - 2 * thickness
        if top < 0:
            top = min(height - th - base, box.y + box.h)
        top = max(0, top)
        cv2.rectangle(
            out, (box.x, top), (box.x + tw + 2 * thickness, top + th + base + thickness), _BOX_RGB, -1
        )
        cv2.putText(
            out, text, (box.x + thickness, top + th + thickness), cv2.FONT_HERSHEY_SIMPLEX, scale, _TEXT_RGB,
            thickness, cv2.LINE_AA,
        )  # fmt: skip
    return out


def write_annotated(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB picture as JPEG.

    Raises:
        OSError: The file cannot be written.
    """
    cv2 = import_cv2()
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise OSError(f"cannot write {path}")
