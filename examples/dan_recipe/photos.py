"""From photos, videos and streams to faces and their probabilities: what predict.py and explain.py share.

Follow one picture through it:

1. :func:`expand_inputs` turns the command line's inputs (image files, video
   files, folders searched recursively, glob patterns, URLs, ``--camera N``) into
   :class:`Source` s; :func:`iter_pictures` reads them one :class:`Picture` at a
   time (an image, with its EXIF orientation applied, or a sampled frame of a
   video or stream, read by :class:`VideoReader` with FFmpeg's messages kept off
   the terminal), reporting and skipping a file that cannot be read.
2. :class:`FaceDetector` finds the faces (OpenCV's Haar frontal-face cascade, as
   the authors' demo, scanned octave by octave from ``--min-face`` up),
   :func:`confirm_in_time` drops the video boxes that no neighbouring frame
   confirms, and :func:`crop_face` cuts a square around each face, with a margin.
3. :func:`group_for_batches` gathers the faces of consecutive pictures into batches
   (a stream's frame at once), and :class:`FaceClassifier` turns the crops into
   the model's input (the evaluation transform the model was trained with) and
   that into probabilities.
4. :class:`PhotoRun` counts what happened, times each stage (:class:`StageTimes`)
   and prints the closing line.

Pictures are ``(H, W, 3)`` ``uint8`` RGB arrays in the orientation a viewer shows,
so boxes are in the pixels a person sees. The cascade ships inside
``opencv-python-headless`` 4.x (``cv2.data.haarcascades``); OpenCV 5 removed it,
hence the ``<5`` pin of the examples extra.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import math
import os
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

import dan_layers

from .model import DAN, LabelsNeededError, ModelInfo, load_model, read_checkpoint
from .records import Box, import_cv2
from .transforms import IMAGE_EXTENSIONS, eval_transform
from .utils import (
    LABEL_SETS,
    CheckpointError,
    CommandParser,
    InputError,
    RecipeError,
    UsageError,
    one_line,
    pick_device,
    set_threads,
    stderr_is_terminal,
)

__all__ = [
    "AUTO_MIN_FACE_SHARE",
    "DEFAULT_CONFIRM_FRAMES",
    "DEFAULT_MARGIN",
    "DEFAULT_MIN_FACE",
    "DEFAULT_MIN_NEIGHBORS",
    "HAAR_FRONTAL_FACE",
    "SYNTHETIC_NOTE",
    "SYNTHETIC_WARNING",
    "VIDEO_EXTENSIONS",
    "FaceClassifier",
    "FaceDetector",
    "FacesInPicture",
    "PhotoRun",
    "Picture",
    "Source",
    "StageTimes",
    "UnreadableFileError",
    "VideoReader",
    "add_shared_flags",
    "check_shared_flags",
    "confirm_in_time",
    "crop_face",
    "expand_inputs",
    "find_faces",
    "group_for_batches",
    "iter_pictures",
    "iter_video_frames",
    "load_checkpoint_for_inference",
    "make_detector",
    "open_model",
    "parse_labels",
    "photo_parser",
    "read_image",
    "same_face",
    "video_frame_count",
    "whole_picture_box",
]


# --------------------------------------------------------------------------------------
# Inputs: files, streams, images, video frames
# --------------------------------------------------------------------------------------

#: File name endings read as videos (case-insensitive); every other file named on the
#: command line is read as an image.
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
_GLOB_CHARS = frozenset("*?[")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

SourceKind = Literal["image", "video", "stream"]


class UnreadableFileError(InputError):
    """A file that cannot be read as an image or video; ``reason`` says why, in one line.

    The commands report it, count it and go on with the next file.
    """


@dataclass(frozen=True)
class Source:
    """One input: a file, a URL that OpenCV opens as a stream, or a camera.

    Attributes:
        path: The file, as given on the command line or found in a folder; for a
            stream, the URL or ``camera:N`` as a path (use :attr:`name`).
        kind: ``"image"`` or ``"video"`` (by the file name's ending), or
            ``"stream"`` (a URL or a camera, read until it ends or Ctrl-C).
        camera: The camera's index for ``--camera N``, else ``None``.
        url: The URL as given (``rtsp://...``, ``file:///...``), else ``None``.

    Example:
        >>> Source(Path("rtsp://cam/live"), "stream", url="rtsp://cam/live").name
        'rtsp://cam/live'
    """

    path: Path
    kind: SourceKind
    camera: int | None = None
    url: str | None = None

    @property
    def name(self) -> str:
        """What the records call it: the path, the URL, or ``camera:N``."""
        if self.camera is not None:
            return f"camera:{self.camera}"
        return self.url if self.url is not None else os.fspath(self.path)


@dataclass(frozen=True)
class Picture:
    """An image, or one sampled frame of a video or stream.

    Attributes:
        source: The input's name (what the output records name; :attr:`Source.name`).
        frame: Index of the frame in the video (0-based), ``None`` for an image.
        time_s: Time of the frame in seconds (frame / fps; for a stream, since its
            first frame), ``None`` for an image or when a video states no frame rate.
        rgb: Pixels, ``(H, W, 3)`` ``uint8`` RGB.
        live: A frame of a stream: its results are wanted at once, not in a batch.
    """

    source: str
    frame: int | None
    time_s: float | None
    rgb: np.ndarray
    live: bool = False


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
            raise InputError(
                f"expected a folder holding images ({', '.join(IMAGE_EXTENSIONS)}) or videos "
                f"({', '.join(VIDEO_EXTENSIONS)}), found none",
                subject=text,
            )
        return files
    if path.exists():
        return [path]
    if _GLOB_CHARS & set(text):
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise InputError(
                "expected a glob pattern that matches files, got one that matches none", subject=text
            )
        files = []
        for match in matches:
            files += _folder_files(Path(match)) if Path(match).is_dir() else [Path(match)]
        return files
    raise InputError(
        "expected an image, a video, a folder, a glob pattern or a URL, got a path that does not exist",
        subject=text,
    )


def expand_inputs(inputs: Sequence[str], cameras: Sequence[int] = ()) -> list[Source]:
    """The inputs that the command line names, in order, each once.

    Args:
        inputs: Image files, video files, folders (searched recursively for files
            ending in an image or video extension), glob patterns (``**``
            allowed) and URLs (``scheme://...``: ``rtsp://``, ``http://``,
            ``file://`` ..., read as streams), mixed.
        cameras: Camera indices (``--camera N``), read as streams after the inputs.

    Returns:
        One :class:`Source` per input, in the order given (folder contents sorted).

    Raises:
        InputError: No inputs, an input that does not exist, a pattern matching
            nothing, or a folder without images or videos.
    """
    if not inputs and not cameras:
        raise InputError(
            "expected at least one image, video, folder, glob pattern, URL or --camera, got none",
            subject="INPUT",
        )
    seen: set[Any] = set()
    sources = []
    for text in inputs:
        if _URL.match(text):
            found = [Source(Path(text), "stream", url=text)]
        else:
            found = [Source(path, _kind_of(path)) for path in _expand_one(text)]
        for source in found:
            key = source.url or source.path.resolve()
            if key not in seen:
                seen.add(key)
                sources.append(source)
    for index in dict.fromkeys(cameras):
        sources.append(Source(Path(f"camera:{index}"), "stream", camera=index))
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


class _QuietStderr:
    """Keeps what C libraries (FFmpeg, OpenCV) write on file descriptor 2 off the terminal.

    ``with quiet:`` points fd 2 at a temporary file for the block (cheap: two
    ``dup2``); :meth:`messages` returns what was written there, one entry per line,
    with FFmpeg's ``[mov,mp4 @ 0x...]`` and OpenCV's ``[ WARN:0@0.1] global file.cpp (12) fn``
    prefixes removed and repeats left out. Python's own ``sys.stderr`` is not touched.
    """

    _PREFIX = re.compile(
        r"^\s*(?:\[[^\]]*@ ?0x[0-9a-fA-F]+\]\s*"  # FFmpeg: [mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0c1a2b3c0]
        r"|\[ ?(?:WARN|ERROR|INFO|DEBUG)[^\]]*\]\s*(?:global\s+\S+:\d+\s+\S+\s+)?)"  # OpenCV's log
    )

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        self._saved: int | None = None

    def __enter__(self) -> _QuietStderr:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stderr.flush()
        try:
            self._saved = os.dup(2)
        except OSError:  # no fd 2 at all (a daemon): nothing to keep off it
            return self
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = None

    def messages(self) -> list[str]:
        """The lines written so far (prefixes removed, each once, in order)."""
        self._file.seek(0)
        lines = self._file.read().decode("utf-8", "replace").splitlines()
        found = [self._PREFIX.sub("", line).strip() for line in lines]
        return list(dict.fromkeys(line for line in found if line))

    def close(self) -> None:
        """Close the temporary file."""
        self._file.close()


class VideoReader:
    """The frames of a video file, a URL or a camera, FFmpeg's messages kept off the terminal.

    Iterating yields frames 0, ``every``, ``2 * every`` ... as RGB :class:`Picture` s;
    frames in between are skipped without being converted (``grab``). Reading
    stops at the end, or at the first frame that cannot be decoded. What OpenCV
    and FFmpeg print while opening and reading is kept (:attr:`messages`), to be
    quoted in the caller's warning, not shown.

    Args:
        source: A video file, a URL, or a camera index.
        every: Take every ``every``-th frame (>= 1).
        live: A stream (URL or camera): the header's frame count is not trusted
            and frame times are seconds since the first frame.
        threads: Decoder threads for FFmpeg (``None``: OpenCV's setting).

    Attributes:
        announced: Frames the file's header announces (may be approximate), or ``None``.
        read: Frames decoded or skipped over so far.
        messages: What FFmpeg and OpenCV printed, see :class:`_QuietStderr`.

    Raises:
        ValueError: ``every`` < 1.
        UnreadableFileError: OpenCV cannot open it or decode its first frame
            (on iteration; the reason quotes FFmpeg where it said something).
    """

    def __init__(
        self,
        source: str | int | os.PathLike[str],
        every: int = 1,
        *,
        live: bool = False,
        threads: int | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        self.source = source if isinstance(source, int) else os.fspath(source)
        self.every = every
        self.live = live
        self.threads = threads
        self.announced: int | None = None
        self.read = 0
        self.messages: list[str] = []

    def _open(self, quiet: _QuietStderr) -> Any:
        cv2 = import_cv2()
        threads = cv2.getNumThreads() if self.threads is None else self.threads
        with quiet:
            if isinstance(self.source, int):
                capture = cv2.VideoCapture(self.source)
                if capture.isOpened():
                    capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not one queued long ago
            else:
                capture = cv2.VideoCapture(self.source, cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, max(1, threads)])
        return capture

    def why(self, default: str) -> str:
        """``default``, followed by what FFmpeg/OpenCV said (``"...; FFmpeg: moov atom not found"``)."""
        said = "; ".join(one_line(m)[:120] for m in self.messages[-2:])
        return f"{default} (FFmpeg/OpenCV: {said})" if said else default

    def __iter__(self) -> Iterator[Picture]:
        cv2 = import_cv2()
        quiet = _QuietStderr()
        capture = None
        try:
            capture = self._open(quiet)
            if not capture.isOpened():
                self.messages = quiet.messages()
                what = "OpenCV cannot open it" + ("" if self.live else " as a video")
                raise UnreadableFileError(self.why(what))
            count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            self.announced = count if count > 0 and not self.live else None
            fps = float(capture.get(cv2.CAP_PROP_FPS))
            name = f"camera:{self.source}" if isinstance(self.source, int) else self.source
            started = None
            while True:
                with quiet:
                    if self.read % self.every:
                        ok, bgr = capture.grab(), None
                    else:
                        ok, bgr = capture.read()
                if not ok:
                    self.messages = quiet.messages()
                    if self.read == 0:
                        raise UnreadableFileError(self.why("OpenCV cannot decode a frame of it"))
                    return
                index = self.read
                self.read += 1
                if bgr is None:
                    continue
                if self.live:
                    now = time.perf_counter()
                    started = now if started is None else started
                    time_s: float | None = now - started
                else:
                    time_s = index / fps if fps > 0 else None
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                yield Picture(name, index, time_s, rgb, self.live)
        finally:
            if capture is not None:
                with quiet:
                    capture.release()
            if not self.messages:
                self.messages = quiet.messages()
            quiet.close()

    def shortfall(self) -> int:
        """Frames the header announced that were not read (0 when it announced none, or for a stream)."""
        return max(0, self.announced - self.read) if self.announced is not None else 0


def video_frame_count(path: str | os.PathLike[str]) -> int | None:
    """Frames the video's header announces (may be approximate), or ``None`` if it says nothing.

    FFmpeg's messages about a broken file are kept off the terminal.
    """
    cv2 = import_cv2()
    quiet = _QuietStderr()
    try:
        with quiet:
            capture = cv2.VideoCapture(os.fspath(path))
            try:
                count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
            finally:
                capture.release()
    finally:
        quiet.close()
    return count if count > 0 else None


def iter_video_frames(path: str | os.PathLike[str], every: int = 1) -> Iterator[Picture]:
    """Frames 0, ``every``, ``2 * every`` ... of a video file, as RGB pictures (see :class:`VideoReader`).

    Raises:
        ValueError: ``every`` < 1.
        UnreadableFileError: OpenCV cannot open the file or decode its first frame.
    """
    return iter(VideoReader(path, every))


def iter_pictures(
    sources: Sequence[Source],
    *,
    every: int = 1,
    on_unreadable: Callable[[Source, str], None],
    on_source: Callable[[Source], None] | None = None,
    on_short: Callable[[Source, VideoReader], None] | None = None,
) -> Iterator[Picture]:
    """Every image and every sampled video frame of ``sources``, in order.

    Args:
        sources: From :func:`expand_inputs`.
        every: For videos and streams: take every ``every``-th frame.
        on_unreadable: Called with the source and the reason for a file that cannot
            be read; the file is then skipped (a video whose later frames fail keeps
            the frames read so far).
        on_source: Called once a file has been read (or skipped), e.g. to advance a
            progress bar.
        on_short: Called with the source and its reader when a video ends before
            the frame its header announced (cut short, or a frame that cannot be
            decoded); see :meth:`VideoReader.shortfall`.
    """
    for source in sources:
        try:
            if source.kind == "image":
                yield Picture(source.name, None, None, read_image(source.path))
            else:
                live = source.kind == "stream"
                where: str | int = source.camera if source.camera is not None else source.name
                reader = VideoReader(where, every, live=live)
                yield from reader
                if on_short is not None and reader.shortfall():
                    on_short(source, reader)
        except UnreadableFileError as exc:
            on_unreadable(source, str(exc))
        if on_source is not None:
            on_source(source)


# --------------------------------------------------------------------------------------
# Faces: detection and crops
# --------------------------------------------------------------------------------------

#: The cascade file of the authors' demo.
HAAR_FRONTAL_FACE = "haarcascade_frontalface_default.xml"
#: Smallest face looked for, in pixels, whatever the picture's size. Below it the
#: cascade's hits on a 512 px portrait are patches of clothing (26-27 px at a scale
#: factor of 1.05), and a face that small holds little expression once upscaled to 224 px.
DEFAULT_MIN_FACE = 32
#: ``--min-face auto`` (the default): faces from this share of the picture's shorter
#: side up (and from :data:`DEFAULT_MIN_FACE` px). The cascade's 24 px window then
#: scans at most 480 px of that side: 54 px faces on a 1920 x 1080 picture, 32 on 640 x 480.
AUTO_MIN_FACE_SHARE = 0.05
#: Margin added on each side of a box, as a fraction of its side (crop side = 1.4 x box).
DEFAULT_MARGIN = 0.2
#: Hits a face needs on the octave scan (``--min-neighbors``). Every size is searched
#: at the density OpenCV keeps for faces under 48 px, where a face gets 4-20 hits; 3
#: finds every face of the test photos (32-405 px) and puts fewer boxes on the photos
#: without a face than OpenCV's full scan at its 5 (docs/_photos_notes.md).
DEFAULT_MIN_NEIGHBORS = 3
#: Video boxes must be seen again within this many sampled frames before or after
#: (``--confirm-frames``; 0 keeps every box).
DEFAULT_CONFIRM_FRAMES = 1


def _positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _load_cascade(name: str) -> Any:
    cv2 = import_cv2()
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder or "") / name
    if folder is None or not path.is_file():
        raise RecipeError(
            f"OpenCV {cv2.__version__} has no Haar cascade {name}: expected opencv-python-headless>=4.5,<5 "
            "(OpenCV 5 removed the cascades); pip install 'opencv-python-headless>=4.5,<5'"
        )
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise RecipeError(f"OpenCV cannot load the Haar cascade {path}")
    return cascade


class FaceDetector:
    r"""OpenCV's Haar frontal-face cascade on RGB pictures, scanned octave by octave.

    OpenCV slides the cascade's $24 \times 24$ window over the picture scaled by
    $f = s^k$ ($s$ = ``scale_factor``), two pixels at a step while $f < 2$ and one
    pixel from $f \ge 2$ on: faces of 48 px and more were searched at 4 times the
    density of smaller ones, most of the time went there, and ``min_neighbors``
    (the hits a face needs) asked for much less of them. Here the picture is first
    scaled so that ``min_face`` becomes the window, then halved again and again
    (octaves); each octave is searched for windows of 24 to 47 px only, so every
    face size gets the same density, and the hits of all octaves are grouped
    together in the picture's pixels (``cv2.groupRectangles``, OpenCV's own
    grouping). A box at octave scale $q$ maps back as $x = x_q \cdot W / W_q$.

    Args:
        min_face: Smallest face side looked for, in source pixels (>= 1), or
            ``None`` (``--min-face auto``): :data:`AUTO_MIN_FACE_SHARE` of the
            picture's shorter side, at least :data:`DEFAULT_MIN_FACE`.
        scale_factor: Step between the scales searched (> 1); smaller finds more
            faces, and more false ones, more slowly.
        min_neighbors: Overlapping hits needed to keep a face (>= 0; 0 returns the
            raw hits); higher keeps fewer, surer faces.
        cascade: File name inside ``cv2.data.haarcascades``.
        confirm_frames: In videos, a box must be seen again within this many
            sampled frames before or after (>= 0; 0: no check); see :func:`confirm_in_time`.

    Shape:
        picture ``(H, W, 3)`` ``uint8`` RGB -> list of :class:`~dan_recipe.records.Box`
        in its pixels, sorted by ``x`` then ``y``.

    Raises:
        ValueError: A parameter out of range.
        RecipeError: OpenCV or its cascade is missing.

    Example:
        >>> import numpy as np
        >>> FaceDetector()(np.zeros((64, 64, 3), np.uint8))
        []
        >>> FaceDetector().min_face_for(1080, 1920), FaceDetector(min_face=40).min_face_for(1080, 1920)
        (54, 40)
    """

    def __init__(
        self,
        min_face: int | None = None,
        scale_factor: float = 1.1,
        min_neighbors: int = DEFAULT_MIN_NEIGHBORS,
        cascade: str = HAAR_FRONTAL_FACE,
        confirm_frames: int = DEFAULT_CONFIRM_FRAMES,
    ) -> None:
        self.min_face = None if min_face is None else _positive_int("min_face", min_face, 1)
        if not isinstance(scale_factor, (int, float)) or isinstance(scale_factor, bool) or scale_factor <= 1:
            raise ValueError(f"scale_factor: expected a number > 1, got {scale_factor!r}")
        self.scale_factor = float(scale_factor)
        self.min_neighbors = _positive_int("min_neighbors", min_neighbors, 0)
        self.confirm_frames = _positive_int("confirm_frames", confirm_frames, 0)
        self._cv2 = import_cv2()
        self._cascade = _load_cascade(cascade)
        width, height = self._cascade.getOriginalWindowSize()
        self._window = (int(width), int(height))

    def min_face_for(self, height: int, width: int) -> int:
        """The smallest face side looked for in an ``height`` x ``width`` picture, in its pixels."""
        if self.min_face is not None:
            return self.min_face
        return max(DEFAULT_MIN_FACE, math.ceil(AUTO_MIN_FACE_SHARE * min(height, width) - 1e-9))

    def hits(self, gray: np.ndarray) -> np.ndarray:
        """Every window the cascade accepts, ungrouped: ``(N, 4)`` ``int32`` ``[x, y, w, h]`` in ``gray``."""
        cv2 = self._cv2
        height, width = gray.shape[:2]
        win_w, win_h = self._window
        min_face = self.min_face_for(height, width)
        scale = min(1.0, win_w / min_face)
        level, found = gray, []
        top = (2 * win_w - 1, 2 * win_h - 1)  # scale factors below 2: OpenCV's two-pixel step
        while True:
            size = (round(width * scale), round(height * scale))
            if size[0] < win_w or size[1] < win_h:
                break
            if size != (level.shape[1], level.shape[0]):
                level = cv2.resize(level, size, interpolation=cv2.INTER_AREA)
            rows = np.asarray(
                self._cascade.detectMultiScale(
                    level, scaleFactor=self.scale_factor, minNeighbors=0, minSize=self._window, maxSize=top
                ),
                dtype=np.float64,
            ).reshape(-1, 4)
            if len(rows):
                sx, sy = width / size[0], height / size[1]
                x0, y0 = np.rint(rows[:, 0] * sx), np.rint(rows[:, 1] * sy)
                x1, y1 = np.rint((rows[:, 0] + rows[:, 2]) * sx), np.rint((rows[:, 1] + rows[:, 3]) * sy)
                found.append(np.stack([x0, y0, x1 - x0, y1 - y0], axis=1))
            scale /= 2
        return np.concatenate(found).astype(np.int32) if found else np.zeros((0, 4), np.int32)

    def __call__(self, rgb: np.ndarray) -> list[Box]:
        """The faces of an ``(H, W, 3)`` ``uint8`` RGB picture, sorted by ``x`` then ``y``."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"picture: expected an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
        hits = self.hits(self._cv2.cvtColor(rgb, self._cv2.COLOR_RGB2GRAY))
        if self.min_neighbors and len(hits):
            grouped, _ = self._cv2.groupRectangles(hits.tolist(), self.min_neighbors, 0.2)
            hits = np.asarray(grouped).reshape(-1, 4)
        return sorted(Box(*(int(v) for v in row)) for row in hits)

    def __repr__(self) -> str:
        return (
            f"FaceDetector(min_face={'auto' if self.min_face is None else self.min_face}, "
            f"scale_factor={self.scale_factor}, min_neighbors={self.min_neighbors}, "
            f"confirm_frames={self.confirm_frames})"
        )


def same_face(a: Box, b: Box) -> bool:
    """Whether two boxes (of neighbouring frames) hold each other's centre.

    Example:
        >>> same_face(Box(0, 0, 10, 10), Box(4, 4, 10, 10)), same_face(Box(0, 0, 10, 10), Box(6, 0, 10, 10))
        (True, False)
    """

    def holds(outer: Box, inner: Box) -> bool:
        cx, cy = inner.x + inner.w / 2, inner.y + inner.h / 2
        return outer.x <= cx < outer.x + outer.w and outer.y <= cy < outer.y + outer.h

    return holds(a, b) and holds(b, a)


def confirm_in_time(
    items: Iterable[tuple[Picture, list[Box]]],
    radius: int = DEFAULT_CONFIRM_FRAMES,
    on_dropped: Callable[[Picture, list[Box]], None] | None = None,
) -> Iterator[tuple[Picture, list[Box]]]:
    """Drop the video boxes that no neighbouring frame confirms.

    A box of a video frame is kept if one of the ``radius`` sampled frames before
    it or after it (of the same video) has a box at the same place
    (:func:`same_face`). Images, and a video of one sampled frame, keep every box.
    A frame comes out once the ``radius`` frames after it have been detected: the
    cost is ``radius`` frames of latency on a stream, nothing on a file.

    Args:
        items: Pictures and their boxes, in order.
        radius: Sampled frames looked at on each side (>= 0; 0 keeps every box).
        on_dropped: Called with a frame and the boxes dropped from it.
    """
    radius = _positive_int("radius", radius, 0)
    before: deque[list[Box]] = deque(maxlen=max(radius, 1))
    ahead: deque[tuple[Picture, list[Box]]] = deque()

    def judged(picture: Picture, boxes: list[Box]) -> tuple[Picture, list[Box]]:
        if not before and not ahead:  # a video of one sampled frame: nothing to compare with
            return picture, boxes
        neighbours = [b for frame in before for b in frame] + [b for _, frame in ahead for b in frame]
        kept = [box for box in boxes if any(same_face(box, other) for other in neighbours)]
        if len(kept) < len(boxes) and on_dropped is not None:
            on_dropped(picture, [box for box in boxes if box not in kept])
        return picture, kept

    def flush() -> Iterator[tuple[Picture, list[Box]]]:
        while ahead:
            picture, boxes = ahead.popleft()
            yield judged(picture, boxes)
            before.append(boxes)
        before.clear()

    current: str | None = None
    for picture, boxes in items:
        if radius == 0 or picture.frame is None:
            yield from flush()
            current = None
            yield picture, boxes
            continue
        if picture.source != current:
            yield from flush()
            current = picture.source
        ahead.append((picture, boxes))
        if len(ahead) > radius:
            first = ahead.popleft()
            yield judged(*first)
            before.append(first[1])
    yield from flush()


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


class StageTimes:
    """Seconds spent in each stage of a run (``decode``, ``detect``, ``classify``, ``write`` ...).

    Example:
        >>> times = StageTimes()
        >>> with times("detect"):
        ...     pass
        >>> list(times.seconds)
        ['detect']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Add the time spent in the block to ``stage``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def find_faces(
    pictures: Iterable[Picture],
    detector: FaceDetector | None,
    margin: float = DEFAULT_MARGIN,
    *,
    times: StageTimes | None = None,
    on_dropped: Callable[[Picture, list[Box]], None] | None = None,
) -> Iterator[FacesInPicture]:
    """The faces of every picture: detected, confirmed by neighbouring video frames, cropped.

    Args:
        pictures: Images and frames.
        detector: The face detector (its ``confirm_frames`` is the video rule of
            :func:`confirm_in_time`); ``None`` takes each whole picture as one face
            crop (``--no-detect``: the pictures are face crops already), without margin.
        margin: Margin of the crops around detected boxes (see :func:`crop_face`).
        times: Receives the time spent detecting and cropping (stage ``detect``).
        on_dropped: Called with a frame and the boxes that no neighbouring frame confirmed.
    """
    times = times or StageTimes()

    def detected() -> Iterator[tuple[Picture, list[Box]]]:
        for picture in pictures:
            if detector is None:
                yield picture, [whole_picture_box(picture.rgb)]
                continue
            with times("detect"):
                boxes = detector(picture.rgb)
            yield picture, boxes

    radius = 0 if detector is None else detector.confirm_frames
    for picture, boxes in confirm_in_time(detected(), radius, on_dropped):
        if detector is None:
            yield FacesInPicture(picture, boxes, [picture.rgb])
            continue
        with times("detect"):
            crops = [crop_face(picture.rgb, box, margin) for box in boxes]
        yield FacesInPicture(picture, boxes, crops)


def group_for_batches(items: Iterable[FacesInPicture], batch_size: int) -> Iterator[list[FacesInPicture]]:
    """Consecutive pictures, grouped until a group holds ``batch_size`` faces (or pictures) or more.

    The last group may hold fewer, and so does a group that ends with a frame of a
    stream (``picture.live``): its results are wanted now. The bound on pictures
    keeps memory bounded where pictures have no faces (a long video of an empty
    room). A group's faces, in order, are its pictures' faces one picture after the other.

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
        if faces >= batch_size or len(group) >= batch_size or item.picture.live:
            yield group
            group, faces = [], 0
    if group:
        yield group


# --------------------------------------------------------------------------------------
# The model on face crops
# --------------------------------------------------------------------------------------

_LABEL_ALIASES = {"affectnet8": "affectnet", "raf-db": "rafdb", "raf": "rafdb"}


def parse_labels(text: str | None) -> str | tuple[str, ...] | None:
    """``--labels``: a known class order (see :data:`~dan_recipe.utils.LABEL_SETS`) or comma-separated names.

    Raises:
        UsageError: An empty name, or the same name twice.
    """
    if text is None:
        return None
    key = text.strip().lower()
    key = _LABEL_ALIASES.get(key, key)
    if key in LABEL_SETS:
        return key
    names = tuple(name.strip() for name in text.split(","))
    if len(names) < 2 or not all(names):
        raise UsageError(
            f"expected one of {', '.join(LABEL_SETS)} or comma-separated class names in logit "
            "order (e.g. angry,happy,neutral)",
            subject=f"--labels {text}",
        )
    if len(set(names)) != len(names):
        raise UsageError("expected distinct class names, got a name twice", subject=f"--labels {text}")
    return names


def authors_seven_class_default(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Class order for an authors' 7-class checkpoint given without ``--labels``, and why.

    Their files are named after the data set (``rafdb_epoch21_acc0.897...pth``,
    ``affecnet7_epoch6_acc0.6569.pth``); a name that says neither gets RAF-DB's order,
    the data set of their best-known 7-class model.

    Returns:
        ``("rafdb" | "affectnet7", reason)``.
    """
    name = os.path.basename(os.fspath(path)).lower()
    if "affecnet7" in name or "affectnet7" in name or "affectnet-7" in name:
        return "affectnet7", "its file name says AffectNet-7"
    if "raf" in name:
        return "rafdb", "its file name says RAF-DB"
    return "rafdb", "the default for an authors' 7-class checkpoint"


def load_checkpoint_for_inference(
    path: str,
    *,
    labels: str | None = None,
    device: torch.device | str = "cpu",
    fast: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[DAN, ModelInfo]:
    """Load a model (ours, in any of its files, or the authors') for the photo commands.

    Args:
        path: ``--checkpoint``: ``best.pt``, a folder with ``model.safetensors`` +
            ``config.json``, or an authors' ``.pth``.
        labels: ``--labels`` text (see :func:`parse_labels`); for one of ours it
            overrides the saved names.
        device: Where the model runs.
        fast: Re-parameterize the attention (same outputs, fewer operations) and
            use channels-last memory; ``False`` keeps the plain eval-mode model.
        log: Receives a note when the class order of an authors' checkpoint is chosen
            without ``--labels``.

    Returns:
        ``(model, info)`` as :func:`~dan_recipe.model.load_model`, ``info.path`` = ``path``.

    Raises:
        InputError: No such file.
        UsageError: ``--labels`` that do not fit the checkpoint.
        CheckpointError: An unreadable file, or one that is not a DAN's.
    """
    flag = f"--checkpoint {path}"
    release = Path(path).is_dir() or str(path).endswith(".safetensors")
    raw: Any = path if release else read_checkpoint(path, "--checkpoint")
    if not release and not isinstance(raw, Mapping):
        raise CheckpointError(
            f"expected a DAN checkpoint (a dict of weights), got a {type(raw).__name__}", subject=flag
        )
    parsed = parse_labels(labels)
    try:
        try:
            model, info = load_model(raw, labels=parsed, device=device)
        except LabelsNeededError as exc:
            if exc.num_classes != 7:
                raise
            parsed, why = authors_seven_class_default(path)
            model, info = load_model(raw, labels=parsed, device=device)
            log(
                f"note: {flag} holds no class names; using the {parsed} order ({why}): "
                f"{', '.join(info.class_names)}. Pass --labels to choose another"
            )
    except CheckpointError as exc:
        raise CheckpointError(exc.reason, subject=flag) from None
    except InputError as exc:
        raise InputError(exc.reason, subject=flag) from None
    except UsageError as exc:  # labels= that do not fit
        raise UsageError(exc.reason, subject=f"--labels {labels}") from None
    if fast:
        model = dan_layers.reparameterize_model(model)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model, replace(info, path=path)


class FaceClassifier:
    """Face crops to the model's input batch, and that batch to class probabilities.

    Args:
        model: A DAN in eval mode (from :func:`load_checkpoint_for_inference`).
        info: Its :class:`~dan_recipe.checkpoints.ModelInfo` (input size, normalisation).
        device: Where the model is.
        channels_last: Give the model channels-last input (the fast path).
    """

    def __init__(
        self, model: DAN, info: ModelInfo, device: torch.device | str = "cpu", *, channels_last: bool = False
    ) -> None:
        self.model = model
        self.info = info
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.preprocess = eval_transform(info.image_size, info.mean, info.std)

    def batch(self, crops: Sequence[np.ndarray]) -> Tensor:
        """``(B, 3, S, S)`` normalised input on the model's device for ``uint8`` RGB crops of any size."""
        if not crops:
            raise ValueError("crops: expected at least one face crop, got none")
        x = torch.stack([self.preprocess(crop) for crop in crops]).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def to_pixels(self, batch: Tensor) -> np.ndarray:
        """The inverse of the normalisation: ``(B, S, S, 3)`` ``uint8`` RGB, what the model saw."""
        mean = torch.tensor(self.info.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, device=batch.device).view(1, -1, 1, 1)
        pixels = (batch.detach() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    @torch.inference_mode()
    def probabilities(self, batch: Tensor) -> Tensor:
        """Softmax of the logits, ``(B, num_classes)`` float32 on the CPU."""
        logits = self.model(batch)[0]
        return torch.softmax(logits.float(), dim=1).cpu()

    def classify(self, crops: Sequence[np.ndarray], batch_size: int) -> Tensor:
        """Probabilities of every crop, ``batch_size`` crops per forward pass."""
        parts = [
            self.probabilities(self.batch(crops[i : i + batch_size])) for i in range(0, len(crops), batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, len(self.info.class_names))


# --------------------------------------------------------------------------------------
# The shared command line, and the bookkeeping of a run
# --------------------------------------------------------------------------------------


def photo_parser(
    prog: str, description: str, epilog: str, *, batch_size: int, camera: bool = False
) -> CommandParser:
    """A :class:`CommandParser` for ``prog`` with the shared flags (see :func:`add_shared_flags`).

    Args:
        prog: The command's file name.
        description: What it does, for ``--help``.
        epilog: Examples and the output format, shown as written.
        batch_size: Default of ``--batch-size``.
        camera: Also take ``--camera N`` (then INPUT may be left out).
    """
    parser = CommandParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shared_flags(parser, batch_size=batch_size, camera=camera)
    return parser


def _min_face(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or an int >= 1, got {text}")
    return int(text)


def add_shared_flags(parser: argparse.ArgumentParser, *, batch_size: int, camera: bool = False) -> None:
    """Add the flags both photo commands take.

    Args:
        parser: The command's parser.
        batch_size: Default of ``--batch-size``.
        camera: Also add ``--camera N`` (a camera read as a stream) and make INPUT optional.
    """
    parser.add_argument(
        "inputs",
        nargs="*" if camera else "+",
        metavar="INPUT",
        help="image or video files, folders (searched recursively), glob patterns, or URLs that OpenCV "
        "opens as streams (rtsp://, http://, file:// ...)",
    )
    if camera:
        parser.add_argument(
            "--camera",
            type=int,
            action="append",
            default=[],
            metavar="N",
            help="read camera N (0: the first) frame by frame until Ctrl-C; may be repeated",
        )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a train_dan.py checkpoint (best.pt) or one of the authors' .pth files",
    )
    parser.add_argument(
        "--labels",
        metavar="NAMES",
        help="class order: rafdb, affectnet7, affectnet (8 classes) or comma-separated names; "
        "default: the names saved in our checkpoints; for the authors' files AffectNet-8 "
        "with 8 classes and, with 7, the data set their file name says, else rafdb",
    )
    g = parser.add_argument_group("faces")
    g.add_argument(
        "--no-detect",
        action="store_true",
        help="the pictures are face crops already (RAF-DB / AffectNet style): no detection",
    )
    g.add_argument(
        "--min-face",
        type=_min_face,
        default=None,
        metavar="PX",
        help=f"smallest face looked for, in the picture's pixels; auto (default): "
        f"{100 * AUTO_MIN_FACE_SHARE:g}%% of its shorter side, at least {DEFAULT_MIN_FACE} px (54 px on "
        f"1920 x 1080, {DEFAULT_MIN_FACE} on 640 x 480); smaller is slower (time grows as 1 / PX^2)",
    )
    g.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"crop margin on each side, fraction of the box (default {DEFAULT_MARGIN})",
    )
    g.add_argument("--scale-factor", type=float, default=1.1, help="Haar cascade scale step (default 1.1)")
    g.add_argument(
        "--min-neighbors",
        type=int,
        default=DEFAULT_MIN_NEIGHBORS,
        help=f"Haar cascade hits a face needs (default {DEFAULT_MIN_NEIGHBORS}); more: fewer, surer faces",
    )
    g.add_argument(
        "--confirm-frames",
        type=int,
        default=DEFAULT_CONFIRM_FRAMES,
        metavar="N",
        help="videos: keep a box only if one of the N sampled frames before or after has a box at the "
        f"same place (default {DEFAULT_CONFIRM_FRAMES}; costs N frames of delay on a stream; 0: keep all)",
    )
    g.add_argument("--every", type=int, default=1, metavar="N", help="videos: every N-th frame (default 1)")
    g = parser.add_argument_group("model")
    g.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"faces per forward pass (default {batch_size})"
    )
    g.add_argument(
        "--no-fast",
        dest="fast",
        action="store_false",
        help="plain eval-mode model (default: re-parameterized attention, channels-last)",
    )
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    g.add_argument(
        "--threads",
        default=None,
        help="threads of torch, OpenCV and the video decoder: a count or auto (default: torch's)",
    )
    g = parser.add_argument_group("run")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )


def check_shared_flags(args: argparse.Namespace) -> None:
    """Range checks of the shared flags.

    Raises:
        UsageError: A value out of range, naming the flag.
    """
    for flag, value, low in (
        ("--min-neighbors", args.min_neighbors, 0),
        ("--confirm-frames", args.confirm_frames, 0),
        ("--every", args.every, 1),
        ("--batch-size", args.batch_size, 1),
        *(("--camera", index, 0) for index in getattr(args, "camera", [])),
    ):
        if value < low:
            raise UsageError(f"expected an int >= {low}, got {value}", subject=flag)
    if not args.margin >= 0:
        raise UsageError(f"expected a number >= 0, got {args.margin}", subject="--margin")
    if not args.scale_factor > 1:
        raise UsageError(f"expected a number > 1, got {args.scale_factor}", subject="--scale-factor")
    if args.threads not in (None, "auto") and not (str(args.threads).isdigit() and int(args.threads) >= 1):
        raise UsageError(f"expected auto or an int >= 1, got {args.threads}", subject="--threads")


#: Drawn on every picture ``predict.py --annotate`` writes with such a model.
SYNTHETIC_NOTE = "model of synthetic faces: labels mean nothing here"
#: Said once by both photo commands for a model that learnt from the built-in synthetic faces only.
SYNTHETIC_WARNING = (
    "warning: --checkpoint {checkpoint} learnt from synthetic cartoon faces only: its labels say nothing about "
    "real faces (use it to try the commands; for expressions, use a model trained on RAF-DB or AffectNet)"
)


def open_model(args: argparse.Namespace, log: Any) -> tuple[DAN, ModelInfo, FaceClassifier]:
    """Threads (torch's, and OpenCV's the same), device, the model of ``--checkpoint`` and its classifier."""
    threads = set_threads(args.threads, log)
    import_cv2().setNumThreads(threads)
    device = pick_device(args.device)
    model, info = load_checkpoint_for_inference(
        args.checkpoint, labels=args.labels, device=device, fast=args.fast, log=log
    )
    if info.synthetic:
        log(SYNTHETIC_WARNING.format(checkpoint=args.checkpoint))
    return model, info, FaceClassifier(model, info, device, channels_last=args.fast)


def make_detector(args: argparse.Namespace) -> FaceDetector | None:
    """The Haar detector the flags describe, or ``None`` for ``--no-detect``."""
    if args.no_detect:
        return None
    return FaceDetector(
        args.min_face, args.scale_factor, args.min_neighbors, confirm_frames=args.confirm_frames
    )


class PhotoRun:
    """The pictures of one command run, with progress, counts, stage times and the closing line.

    Nothing is lost without a word: an unreadable file is one ``warning: skipped``
    line (held back until some input has been read, so that a run whose every input
    is unreadable says so in its one ``error:`` line), a video that ends before the
    frame its header announces is one warning line, and the closing line counts
    both, with the boxes that no neighbouring frame confirmed and the time of every stage.

    Args:
        command: The command's name, for the closing line.
        sources: The expanded inputs.
        every: Every N-th video frame.
        progress: Draw a bar (``None``: when stderr is a terminal).
    """

    def __init__(self, command: str, sources: Sequence[Source], every: int, progress: bool | None) -> None:
        from tqdm import tqdm

        self.command = command
        self.sources = list(sources)
        self.every = every
        self.live = any(s.kind == "stream" for s in self.sources)
        self.started = time.perf_counter()
        self.times = StageTimes()
        self.counts = {"images": 0, "videos": 0, "frames": 0, "faces": 0, "faceless": 0, "unread_frames": 0,
                       "unconfirmed": 0, "streams": 0}  # fmt: skip
        self.unreadable: list[tuple[str, str]] = []
        self.interrupted = False
        self._held: list[str] = []  # warnings held until an input has been read
        self._expected = {s.name: self._announced(s) for s in self.sources}
        self._seen: dict[str, int] = {}
        self.bar = tqdm(
            total=None if self.live else sum(self._expected.values()),
            unit="picture",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (stderr_is_terminal() if progress is None else progress),
            leave=False,
        )

    def _announced(self, source: Source) -> int:
        if source.kind == "image":
            return 1
        if source.kind == "stream":
            return 0
        frames = video_frame_count(source.path)
        return 1 if frames is None else max(1, math.ceil(frames / self.every))

    def log(self, message: str) -> None:
        """Print a message on stderr without breaking the bar."""
        self.bar.write(message, file=sys.stderr)

    def _warn(self, message: str) -> None:
        if self.counts["images"] or self.counts["frames"]:
            self.log(message)
        else:
            self._held.append(message)

    def _skip(self, source: Source, reason: str) -> None:
        self.unreadable.append((source.name, reason))
        self._warn(f"warning: skipped {source.name}: {reason}")

    def _short(self, source: Source, reader: VideoReader) -> None:
        missing = reader.shortfall()
        self.counts["unread_frames"] += missing
        self._warn(
            f"warning: {source.name}: read {reader.read} of the {reader.announced} frames its header "
            f"announces; {reader.why(f'{missing} frames lost')}"
        )

    def _dropped(self, picture: Picture, boxes: list[Box]) -> None:
        self.counts["unconfirmed"] += len(boxes)

    def _done(self, source: Source) -> None:
        seen, expected = self._seen.pop(source.name, 0), self._expected[source.name]
        if seen != expected and not self.live:  # a video shorter or longer than its header says, or skipped
            self.bar.total += seen - expected
            self.bar.refresh()

    def pictures(self) -> Iterator[Picture]:
        """Every picture of the run, in order; unreadable files are reported and skipped."""
        self.bar.reset(total=self.bar.total)  # the clock starts now, not before the model was loaded
        found = iter_pictures(
            self.sources, every=self.every, on_unreadable=self._skip, on_source=self._done, on_short=self._short
        )
        while True:
            start = time.perf_counter()
            picture = next(found, None)
            self.times.add("decode", time.perf_counter() - start)
            if picture is None:
                return
            self._seen[picture.source] = self._seen.get(picture.source, 0) + 1
            self.counts["frames" if picture.frame is not None else "images"] += 1
            if picture.frame is not None and self._seen[picture.source] == 1:
                self.counts["streams" if picture.live else "videos"] += 1
            for message in self._held:
                self.log(message)
            self._held.clear()
            self.bar.update(1)
            yield picture

    def face_groups(
        self, detector: FaceDetector | None, margin: float, batch_size: int
    ) -> Iterator[list[FacesInPicture]]:
        """The run's pictures with their faces, grouped for batches (see :func:`group_for_batches`).

        A group's faces are counted once the caller asks for the next group, i.e.
        after it has written the group's results.
        """
        faces = find_faces(self.pictures(), detector, margin, times=self.times, on_dropped=self._dropped)
        for group in group_for_batches(faces, batch_size):
            yield group
            for item in group:
                self.counts["faces"] += len(item.boxes)
                self.counts["faceless"] += not item.boxes

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """``with run.stage("classify"):`` adds the block's time to that stage of the closing line."""
        return self.times(name)

    @contextlib.contextmanager
    def interruptible(self, kept: str) -> Iterator[None]:
        """Ctrl-C inside the block ends it: the bar closes, a line says what ``kept`` holds.

        The command then goes on to :meth:`finish`, which prints the closing line and,
        unless the run reads a stream (where Ctrl-C is the way to stop), raises
        ``KeyboardInterrupt`` again (status 130).
        """
        try:
            yield
        except KeyboardInterrupt:
            self.interrupted = True
            self.bar.close()
            self.log(f"interrupted: {kept}")

    def finish(self, wrote: str) -> dict[str, Any]:
        """Close the bar, print the closing line and return the counts.

        Args:
            wrote: What the run wrote (``"stdout"``, a file, a folder), for the line.

        Raises:
            InputError: No input could be read at all (one line: the held warnings
                are not printed).
            KeyboardInterrupt: The run was interrupted and reads no stream.
        """
        self.bar.close()
        c = self.counts
        if not c["images"] and not c["frames"] and self.unreadable and not self.interrupted:
            path, reason = self.unreadable[0]
            n = len(self.unreadable)
            what = "nothing could be read" if n == 1 else f"none of the {n} inputs could be read"
            more = f"; and {_count(n - 1, 'other')}" if n > 1 else ""
            raise InputError(f"{what} ({path}: {reason}{more})", subject="INPUT")
        for message in self._held:
            self.log(message)
        self._held.clear()
        seconds = time.perf_counter() - self.started
        parts = [
            _count(c["images"], "image"),
            f"{_count(c['videos'], 'video')} ({_count(c['frames'], 'frame')})",
            _count(c["faces"], "face"),
            f"{_count(c['faceless'], 'picture')} without a face",
            f"{_count(len(self.unreadable), 'unreadable file')} skipped",
        ]
        if c["streams"]:
            parts[1] = f"{_count(c['videos'], 'video')} and {_count(c['streams'], 'stream')} " \
                       f"({_count(c['frames'], 'frame')})"  # fmt: skip
        if c["unread_frames"]:
            parts.append(f"{_count(c['unread_frames'], 'video frame')} lost")
        if c["unconfirmed"]:
            parts.append(f"{_count(c['unconfirmed'], 'unconfirmed box', 'unconfirmed boxes')} dropped")
        stages = ", ".join(f"{name} {t:.1f}" for name, t in self.times.seconds.items())
        status = "interrupted; " if self.interrupted else ""
        print(
            f"{self.command}: {', '.join(parts)}; {status}wrote {wrote} in {seconds:.1f} s"
            + (f" ({stages} s)" if stages else ""),
            file=sys.stderr,
        )
        result = {
            **c,
            "unreadable": len(self.unreadable),
            "seconds": seconds,
            "stages": dict(self.times.seconds),
        }
        if self.interrupted and not self.live:
            raise KeyboardInterrupt
        return result


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
