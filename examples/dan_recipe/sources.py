"""What ``predict.py`` and ``explain.py`` look at: inputs expanded into files, files read into pictures.

* :func:`expand_inputs` turns the command line's inputs (image files, video files,
  folders searched recursively, glob patterns, mixed) into a list of
  :class:`Source`, in order and without duplicates. A missing input, a pattern
  that matches nothing, or a folder without images or videos is a
  :class:`~dan_recipe.errors.UserError`.
* :func:`read_image` reads an image file (PIL: EXIF orientation applied, RGB);
  :func:`iter_video_frames` reads every ``every``-th frame of a video (OpenCV).
  Both raise :class:`UnreadableFileError` with the reason in one line, which the
  commands report, count and skip.
* :func:`iter_pictures` chains both over all sources, one :class:`Picture` (an
  image, or a sampled frame) at a time.

Pictures are ``(H, W, 3)`` ``uint8`` RGB arrays in the orientation a viewer shows
(EXIF rotation applied), so boxes found on them are in the pixels a person sees.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .data import IMAGE_EXTENSIONS
from .errors import UserError, one_line

__all__ = [
    "VIDEO_EXTENSIONS",
    "Picture",
    "Source",
    "UnreadableFileError",
    "expand_inputs",
    "import_cv2",
    "iter_pictures",
    "iter_video_frames",
    "read_image",
    "video_frame_count",
]

#: File name endings read as videos (case-insensitive); every other file named on the
#: command line is read as an image.
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
_GLOB_CHARS = frozenset("*?[")

SourceKind = Literal["image", "video"]


class UnreadableFileError(Exception):
    """A file that cannot be read as an image or video; ``str()`` is the reason, one line."""


@dataclass(frozen=True)
class Source:
    """One input file.

    Attributes:
        path: The file, as given on the command line or found in a folder.
        kind: ``"image"`` or ``"video"`` (by the file name's ending).
    """

    path: Path
    kind: SourceKind


@dataclass(frozen=True)
class Picture:
    """An image, or one sampled frame of a video.

    Attributes:
        source: The file's path as text (what the output records name).
        frame: Index of the frame in the video (0-based), ``None`` for an image.
        time_s: Time of the frame in seconds (frame / fps), ``None`` for an image or
            when the video does not state its frame rate.
        rgb: Pixels, ``(H, W, 3)`` ``uint8`` RGB.
    """

    source: str
    frame: int | None
    time_s: float | None
    rgb: np.ndarray


def import_cv2() -> Any:
    """``import cv2``, or a :class:`UserError` that says which package to install."""
    try:
        import cv2
    except ImportError:
        raise UserError(
            "OpenCV is not installed: expected the package opencv-python-headless>=4.5,<5 "
            "(pip install 'opencv-python-headless>=4.5,<5', or the examples extra of dan-layers)"
        ) from None
    return cv2


def _kind_of(path: Path) -> SourceKind:
    return "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"


def _folder_files(folder: Path) -> list[Path]:
    """Images and videos under ``folder`` (recursively), sorted; hidden files and folders left out."""
    known = tuple(IMAGE_EXTENSIONS) + VIDEO_EXTENSIONS
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files if not f.startswith(".") and f.lower().endswith(known)]
    return sorted(found)


def _expand_one(text: str) -> list[Path]:
    path = Path(text)
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise UserError(
                f"{text}: expected a folder holding images ({', '.join(IMAGE_EXTENSIONS)}) or videos "
                f"({', '.join(VIDEO_EXTENSIONS)}), found none"
            )
        return files
    if path.exists():
        return [path]
    if _GLOB_CHARS & set(text):
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise UserError(f"{text}: expected a glob pattern that matches files, got one that matches none")
        files = []
        for match in matches:
            files += _folder_files(Path(match)) if Path(match).is_dir() else [Path(match)]
        return files
    raise UserError(
        f"{text}: expected an image, a video, a folder or a glob pattern, got a path that does not exist"
    )


def expand_inputs(inputs: Sequence[str]) -> list[Source]:
    """The files that the command-line ``inputs`` name, in order, each once.

    Args:
        inputs: Image files, video files, folders (searched recursively for files
            ending in an image or video extension) and glob patterns (``**``
            allowed), mixed.

    Returns:
        One :class:`Source` per file, in the order given (folder contents sorted).

    Raises:
        UserError: No inputs, an input that does not exist, a pattern matching
            nothing, or a folder without images or videos.
    """
    if not inputs:
        raise UserError("INPUT: expected at least one image, video, folder or glob pattern, got none")
    seen: set[Path] = set()
    sources = []
    for text in inputs:
        for path in _expand_one(text):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                sources.append(Source(path, _kind_of(path)))
    return sources


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as ``(H, W, 3)`` ``uint8`` RGB, EXIF orientation applied (first frame of a GIF/TIFF).

    Raises:
        UnreadableFileError: The file is not an image that PIL can decode.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            upright = ImageOps.exif_transpose(opened)
            return np.asarray(upright.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError:
        raise UnreadableFileError("not an image file that PIL can decode") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise UnreadableFileError(f"cannot decode the image ({one_line(str(exc))})") from None


def video_frame_count(path: str | os.PathLike[str]) -> int | None:
    """Frames the video's header announces (may be approximate), or ``None`` if it says nothing."""
    cv2 = import_cv2()
    capture = cv2.VideoCapture(os.fspath(path))
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    finally:
        capture.release()
    return count if count > 0 else None


def iter_video_frames(path: str | os.PathLike[str], every: int = 1) -> Iterator[Picture]:
    """Frames 0, ``every``, ``2 * every`` ... of a video, as RGB pictures.

    Frames in between are skipped without being converted (``grab``). Reading stops
    at the end of the video or at the first frame that cannot be decoded.

    Args:
        path: The video file.
        every: Take every ``every``-th frame (>= 1).

    Raises:
        ValueError: ``every`` < 1.
        UnreadableFileError: OpenCV cannot open the file or decode its first frame.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected an int >= 1, got {every!r}")
    cv2 = import_cv2()
    capture = cv2.VideoCapture(os.fspath(path))
    try:
        if not capture.isOpened():
            raise UnreadableFileError("OpenCV cannot open it as a video")
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        index = 0
        while True:
            if index % every:
                if not capture.grab():
                    return
            else:
                ok, bgr = capture.read()
                if not ok:
                    if index == 0:
                        raise UnreadableFileError("OpenCV cannot decode a frame of it")
                    return
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                yield Picture(os.fspath(path), index, index / fps if fps > 0 else None, rgb)
            index += 1
    finally:
        capture.release()


def iter_pictures(
    sources: Sequence[Source],
    *,
    every: int = 1,
    on_unreadable: Callable[[Source, str], None],
    on_source: Callable[[Source], None] | None = None,
) -> Iterator[Picture]:
    """Every image and every sampled video frame of ``sources``, in order.

    Args:
        sources: From :func:`expand_inputs`.
        every: For videos: take every ``every``-th frame.
        on_unreadable: Called with the source and the reason for a file that cannot
            be read; the file is then skipped (a video whose later frames fail keeps
            the frames read so far).
        on_source: Called once a file has been read (or skipped), e.g. to advance a
            progress bar.
    """
    for source in sources:
        try:
            if source.kind == "video":
                yield from iter_video_frames(source.path, every)
            else:
                yield Picture(os.fspath(source.path), None, None, read_image(source.path))
        except UnreadableFileError as exc:
            on_unreadable(source, str(exc))
        if on_source is not None:
            on_source(source)
