"""What the photo commands write: face records (JSON Lines, CSV), annotated pictures, output folders.

* A record (:class:`FaceRecord`) holds ``source`` (the file), ``frame`` (video frame
  index, ``null`` for images), ``time_s`` (the frame's time in seconds, ``null`` for
  images), ``face`` (index of the face in its picture, left to right), ``box``
  (``[x, y, w, h]`` of the detector's box in the picture's pixels, without the crop
  margin), ``label`` (the most probable class) and ``probabilities`` (``{class: p}``
  in the model's class order, summing to 1). A picture without a face gets one
  record whose ``face``, ``box``, ``label`` and ``probabilities`` are ``null``.
  CSV has the columns ``source, frame, time_s, face, x, y, w, h, label`` and then one
  column per class; empty cells stand for ``null``. :func:`open_records` never
  overwrites a file unless asked, and writes under a temporary name that becomes
  the file when the run ends (also by Ctrl-C), so the file holds whole records only.
* :func:`draw_faces`: a picture with each face's box, label and top probability
  (``predict.py --annotate``).
* :func:`prepare_output_folder` refuses a folder that already holds files unless
  ``--overwrite``; :class:`OutputNames` gives every picture (or face) of a run its
  own file name.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

import numpy as np

from .utils import InputError, RecipeError, UsageError

__all__ = [
    "ANNOTATION_SUFFIX",
    "CSV_FIXED_COLUMNS",
    "OUTPUT_SUFFIXES",
    "Box",
    "FaceRecord",
    "OutputNames",
    "RecordWriter",
    "check_output_file",
    "draw_faces",
    "import_cv2",
    "label_style",
    "open_records",
    "prepare_output_folder",
    "write_annotated",
]


class Box(NamedTuple):
    """A face box in picture pixels: left, top, width, height."""

    x: int
    y: int
    w: int
    h: int


def import_cv2() -> Any:
    """``import cv2``, or a :class:`~dan_recipe.utils.RecipeError` that says which package to install."""
    try:
        import cv2
    except ImportError:
        raise RecipeError(
            "OpenCV is not installed: expected the package opencv-python-headless>=4.5,<5 "
            "(pip install 'opencv-python-headless>=4.5,<5', or the examples extra of dan-layers)"
        ) from None
    return cv2


#: CSV columns before the per-class probability columns.
CSV_FIXED_COLUMNS: tuple[str, ...] = ("source", "frame", "time_s", "face", "x", "y", "w", "h", "label")
#: ``--out`` file endings and their formats.
OUTPUT_SUFFIXES: dict[str, str] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_DIGITS = 6  # probabilities and times are rounded to 6 decimals


@dataclass(frozen=True)
class FaceRecord:
    """The result for one face (or for a picture without one: ``box`` is ``None``)."""

    source: str
    frame: int | None
    time_s: float | None
    face: int | None
    box: Box | None
    label: str | None
    probabilities: dict[str, float] | None

    def as_json(self) -> dict[str, Any]:
        """The JSON object of the record (``box`` as a list)."""
        return {
            "source": self.source,
            "frame": self.frame,
            "time_s": None if self.time_s is None else round(self.time_s, _DIGITS),
            "face": self.face,
            "box": None if self.box is None else list(self.box),
            "label": self.label,
            "probabilities": (
                None
                if self.probabilities is None
                else {k: round(v, _DIGITS) for k, v in self.probabilities.items()}
            ),
        }


class RecordWriter(Protocol):
    """Writes records one by one."""

    def write(self, record: FaceRecord) -> None:
        """Write one record."""


class _JsonLinesWriter:
    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, record: FaceRecord) -> None:
        self.stream.write(json.dumps(record.as_json(), ensure_ascii=False) + "\n")
        self.stream.flush()


class _CsvWriter:
    def __init__(self, stream: IO[str], class_names: Sequence[str]) -> None:
        clash = sorted(set(class_names) & set(CSV_FIXED_COLUMNS))
        if clash:
            raise UsageError(
                f"expected class names that are not CSV column names ({', '.join(CSV_FIXED_COLUMNS)}), "
                f"got {', '.join(clash)}; pass --labels with other names or write JSON Lines",
                subject="--out",
            )
        self.class_names = tuple(class_names)
        self.stream = stream
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow([*CSV_FIXED_COLUMNS, *self.class_names])

    def write(self, record: FaceRecord) -> None:
        row = record.as_json()
        box = row["box"] or [None] * 4
        probs = row["probabilities"] or {}
        cells = [row["source"], row["frame"], row["time_s"], row["face"], *box, row["label"]]
        cells += [probs.get(name) for name in self.class_names]
        self.writer.writerow(["" if v is None else v for v in cells])
        self.stream.flush()


def check_output_file(path: str | None, overwrite: bool) -> str | None:
    """The format of ``--out`` (``"jsonl"``, ``"csv"``; ``None`` for stdout), checked before any work.

    Raises:
        UsageError: An unknown ending, a folder, a missing parent folder, or an
            existing file without ``--overwrite``.
    """
    if path is None or path == "-":
        return None
    target = Path(path)
    fmt = OUTPUT_SUFFIXES.get(target.suffix.lower())
    if fmt is None:
        raise UsageError(f"expected a file ending in {', '.join(OUTPUT_SUFFIXES)}", subject=f"--out {path}")
    if target.is_dir():
        raise UsageError("expected a file, got a folder", subject=f"--out {path}")
    if not target.parent.is_dir():
        raise UsageError(
            f"expected a file in an existing folder, got no folder {target.parent}", subject=f"--out {path}"
        )
    if target.exists() and not overwrite:
        raise UsageError(
            "the file exists; pass --overwrite to replace it, or another --out", subject=f"--out {path}"
        )
    return fmt


@contextlib.contextmanager
def open_records(
    path: str | None, class_names: Sequence[str], *, overwrite: bool, live: bool = False
) -> Iterator[RecordWriter]:
    """A writer for ``--out`` (stdout when ``None`` or ``"-"``), JSON Lines or CSV by the file's ending.

    A file is written to a temporary name in its folder and renamed onto ``path``
    when the block ends normally or by Ctrl-C (the records written so far are
    kept); on any other error the temporary file is removed and ``path`` is left
    as it was. With ``live`` (a camera or stream, read until Ctrl-C) the records
    go straight into ``path``, each flushed as it comes. An existing ``path`` is
    replaced only with ``overwrite``.

    Raises:
        UsageError: See :func:`check_output_file`.
    """
    fmt = check_output_file(path, overwrite)
    if path is None or path == "-":
        yield _JsonLinesWriter(sys.stdout)
        return
    target = Path(path)
    if live:
        with open(target, "w", encoding="utf-8", newline="") as stream:
            yield _CsvWriter(stream, class_names) if fmt == "csv" else _JsonLinesWriter(stream)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as stream:
            yield _CsvWriter(stream, class_names) if fmt == "csv" else _JsonLinesWriter(stream)
    except KeyboardInterrupt:
        os.replace(tmp, target)  # keep what was done
        raise
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, target)


# --------------------------------------------------------------------------------------
# Annotated pictures
# --------------------------------------------------------------------------------------

#: File ending of the annotated pictures.
ANNOTATION_SUFFIX = ".jpg"
_BOX_RGB = (40, 220, 90)
_TEXT_RGB = (0, 0, 0)
_NO_FACE_RGB = (250, 120, 30)
#: Cap height of a label as a fraction of the picture's shorter side, and its bounds in pixels.
_TEXT_SHARE, _TEXT_MIN_PX, _TEXT_MAX_PX = 0.035, 11, 120


def label_style(height: int, width: int) -> tuple[float, int, int]:
    """Font scale, text stroke and box line (pixels) that keep labels legible from 320 px to 4K.

    The label's cap height follows the picture (3.5% of its shorter side, at least
    11 px and at most 120 px) and its stroke stays under a tenth of that height, so
    letters keep their counters open ("Sadness" never reads "Sodness"); the box line
    is a little heavier than the text.

    Example:
        >>> label_style(480, 640)
        (0.76, 1, 2)
    """
    cv2 = import_cv2()
    _, cap = cv2.getTextSize("H", cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)[0]
    target = min(_TEXT_MAX_PX, max(_TEXT_MIN_PX, _TEXT_SHARE * min(height, width)))
    scale = round(target / cap, 2)
    stroke = max(1, int(target / 10))
    return scale, stroke, stroke + 1


def _label(out: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int], below: int) -> None:
    """``text`` on a filled strip whose bottom-left is near ``(x, y)``; below ``below`` if it leaves the top."""
    cv2 = import_cv2()
    height, width = out.shape[:2]
    scale, stroke, _ = label_style(height, width)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, stroke)
    if tw + 2 * max(2, th // 4) > width:  # wider than the picture: smaller letters, never cut off
        scale *= 0.95 * width / (tw + 2 * max(2, th // 4))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, stroke)
    pad = max(2, th // 4)
    top = y - th - base - 2 * pad
    if top < 0:
        top = min(height - th - base - 2 * pad, below)
    top, x = max(0, top), max(0, min(x, width - tw - 2 * pad))
    cv2.rectangle(out, (x, top), (x + tw + 2 * pad, top + th + base + 2 * pad), colour, -1)
    cv2.putText(out, text, (x + pad, top + pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, _TEXT_RGB, stroke,
                cv2.LINE_AA)  # fmt: skip


def draw_faces(
    rgb: np.ndarray, faces: Sequence[tuple[Box, str, float]], *, note: str | None = None
) -> np.ndarray:
    """A copy of ``rgb`` with every face's box and ``label probability`` drawn, or a "no face" mark.

    Text and lines are sized with the picture (:func:`label_style`). A picture
    without a face gets an orange "no face found" label in its top-left corner, so
    an annotated folder never holds a picture that looks untouched; a ``note`` goes
    on an orange strip in the bottom-left corner.

    Args:
        rgb: ``(H, W, 3)`` ``uint8`` picture.
        faces: ``(box, label, probability of the label)`` per face.
        note: What the picture should say about its labels, e.g. that the model
            learnt from synthetic faces only.

    Returns:
        The annotated copy.
    """
    cv2 = import_cv2()
    out = np.ascontiguousarray(rgb.copy())
    height, width = out.shape[:2]
    _, _, line = label_style(height, width)
    if not faces:
        _label(out, "no face found", line, 0, _NO_FACE_RGB, line)
    for box, label, prob in faces:
        cv2.rectangle(out, (box.x, box.y), (box.x + box.w - 1, box.y + box.h - 1), _BOX_RGB, line)
        _label(out, f"{label} {prob:.2f}", box.x, box.y - line, _BOX_RGB, box.y + box.h + line)
    if note:
        _label(out, note, line, height, _NO_FACE_RGB, height)
    return out


def write_annotated(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB picture as JPEG.

    Raises:
        OSError: The file cannot be written.
    """
    cv2 = import_cv2()
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise OSError(f"cannot write {path}")


# --------------------------------------------------------------------------------------
# Output folders
# --------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^\w.-]+")


def prepare_output_folder(path: str | Path, flag: str, *, overwrite: bool) -> Path:
    """Create ``path`` if needed; refuse one that holds files unless ``overwrite``.

    Args:
        path: The folder.
        flag: The option that named it (``"--out"``), for the message.
        overwrite: ``--overwrite`` was given.

    Returns:
        The folder.

    Raises:
        UsageError: ``path`` is a file, cannot be created, or holds files and
            ``overwrite`` is false.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError("expected a folder, got a file", subject=f"{flag} {path}")
    if folder.is_dir() and not overwrite:
        held = sum(1 for _ in folder.iterdir())
        if held:
            raise UsageError(
                f"expected an empty or new folder, got one holding {held} entries; pass --overwrite to write "
                "into it (files of the same names are replaced), or another folder",
                subject=f"{flag} {path}",
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder ({exc.strerror})", subject=f"{flag} {path}") from None
    return folder


class OutputNames:
    """Unique file names within one run: one stem per source, then frame and face.

    Example:
        >>> names = OutputNames()
        >>> names.name("photos/a b.jpg", None, None, ".jpg"), names.name("other/a b.jpg", None, None, ".jpg")
        ('a_b.jpg', 'a_b-2.jpg')
        >>> names.name("clip.mp4", 30, 1, ".png")
        'clip_f000030_face1.png'
    """

    def __init__(self) -> None:
        self._stems: dict[str, str] = {}
        self._taken: set[str] = set()

    def _unique(self, base: str) -> str:
        candidate, n = base, 1
        while candidate.lower() in self._taken:
            n += 1
            candidate = f"{base}-{n}"
        self._taken.add(candidate.lower())
        return candidate

    def name(self, source: str, frame: int | None, face: int | None, suffix: str) -> str:
        """A new name: ``<stem>[_f<frame>][_face<i>]<suffix>``.

        ``<stem>`` is the source file's stem (characters other than letters, digits,
        ``.``, ``-`` and ``_`` made ``_``), with ``-2``, ``-3`` ... when another source
        of the run has the same stem.

        Args:
            source: The input file's path.
            frame: Video frame index, or ``None``.
            face: Face index within the picture, or ``None``.
            suffix: File ending, with its dot (or ``""``).
        """
        stem = self._stems.get(source)
        if stem is None:
            stem = self._unique(_UNSAFE.sub("_", Path(source).stem).strip("_") or "picture")
            self._stems[source] = stem
        name = stem + ("" if frame is None else f"_f{frame:06d}") + ("" if face is None else f"_face{face}")
        return (name if name == stem else self._unique(name)) + suffix
