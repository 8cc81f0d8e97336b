"""From photos and videos to face crops and their probabilities: what ``predict.py`` and ``explain.py`` share.

Follow one picture through it:

1. :func:`expand_inputs` turns the command line's inputs (image files, video
   files, folders searched recursively, glob patterns) into :class:`Source` s;
   :func:`iter_pictures` reads them one :class:`Picture` at a time (an image, with
   its EXIF orientation applied, or a sampled video frame), reporting and skipping
   a file that cannot be read.
2. :class:`FaceDetector` finds the faces (OpenCV's Haar frontal-face cascade, as
   the authors' demo) and :func:`crop_face` cuts a square around each, with a margin.
3. :func:`group_for_batches` gathers the faces of consecutive pictures into batches,
   and :class:`FaceClassifier` turns the crops into the model's input (the
   evaluation transform the model was trained with) and that into probabilities.
4. :class:`PhotoRun` counts what happened and prints the closing line.

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
import sys
import time
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
    "DEFAULT_MARGIN",
    "DEFAULT_MIN_FACE",
    "HAAR_FRONTAL_FACE",
    "SYNTHETIC_WARNING",
    "VIDEO_EXTENSIONS",
    "FaceClassifier",
    "FaceDetector",
    "FacesInPicture",
    "PhotoRun",
    "Picture",
    "Source",
    "UnreadableFileError",
    "add_shared_flags",
    "check_shared_flags",
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
    "video_frame_count",
    "whole_picture_box",
]


# --------------------------------------------------------------------------------------
# Inputs: files, images, video frames
# --------------------------------------------------------------------------------------

#: File name endings read as videos (case-insensitive); every other file named on the
#: command line is read as an image.
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
_GLOB_CHARS = frozenset("*?[")

SourceKind = Literal["image", "video"]


class UnreadableFileError(InputError):
    """A file that cannot be read as an image or video; ``reason`` says why, in one line.

    The commands report it, count it and go on with the next file.
    """


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
        "expected an image, a video, a folder or a glob pattern, got a path that does not exist", subject=text
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
        InputError: No inputs, an input that does not exist, a pattern matching
            nothing, or a folder without images or videos.
    """
    if not inputs:
        raise InputError(
            "expected at least one image, video, folder or glob pattern, got none", subject="INPUT"
        )
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


# --------------------------------------------------------------------------------------
# Faces: detection and crops
# --------------------------------------------------------------------------------------

#: The cascade file of the authors' demo.
HAAR_FRONTAL_FACE = "haarcascade_frontalface_default.xml"
#: Smallest face looked for, in pixels. Below it the cascade's hits on a 512 px
#: portrait are patches of clothing (26-27 px at a scale factor of 1.05), and a face
#: that small holds little expression once upscaled to 224 px.
DEFAULT_MIN_FACE = 32
#: Margin added on each side of a box, as a fraction of its side (crop side = 1.4 x box).
DEFAULT_MARGIN = 0.2


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
        RecipeError: OpenCV or its cascade is missing.

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


def photo_parser(prog: str, description: str, epilog: str, *, batch_size: int) -> CommandParser:
    """A :class:`CommandParser` for ``prog`` with the shared flags (see :func:`add_shared_flags`).

    Args:
        prog: The command's file name.
        description: What it does, for ``--help``.
        epilog: Examples and the output format, shown as written.
        batch_size: Default of ``--batch-size``.
    """
    parser = CommandParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shared_flags(parser, batch_size=batch_size)
    return parser


def add_shared_flags(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    """Add the flags both photo commands take.

    Args:
        parser: The command's parser.
        batch_size: Default of ``--batch-size``.
    """
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image or video files, folders (searched recursively), glob patterns",
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
        type=int,
        default=DEFAULT_MIN_FACE,
        metavar="PX",
        help=f"smallest face looked for, pixels (default {DEFAULT_MIN_FACE})",
    )
    g.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"crop margin on each side, fraction of the box (default {DEFAULT_MARGIN})",
    )
    g.add_argument("--scale-factor", type=float, default=1.1, help="Haar cascade scale step (default 1.1)")
    g.add_argument("--min-neighbors", type=int, default=5, help="Haar cascade hits per face (default 5)")
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
    g.add_argument("--threads", default=None, help="torch threads: a count or auto (default: torch's)")
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
        ("--min-face", args.min_face, 1),
        ("--min-neighbors", args.min_neighbors, 0),
        ("--every", args.every, 1),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            raise UsageError(f"expected an int >= {low}, got {value}", subject=flag)
    if not args.margin >= 0:
        raise UsageError(f"expected a number >= 0, got {args.margin}", subject="--margin")
    if not args.scale_factor > 1:
        raise UsageError(f"expected a number > 1, got {args.scale_factor}", subject="--scale-factor")
    if args.threads not in (None, "auto") and not (str(args.threads).isdigit() and int(args.threads) >= 1):
        raise UsageError(f"expected auto or an int >= 1, got {args.threads}", subject="--threads")


#: Said once by both photo commands for a model that learnt from the built-in synthetic faces only.
SYNTHETIC_WARNING = (
    "warning: --checkpoint {checkpoint} learnt from synthetic cartoon faces only: its labels say nothing about "
    "real faces (use it to try the commands; for expressions, use a model trained on RAF-DB or AffectNet)"
)


def open_model(args: argparse.Namespace, log: Any) -> tuple[DAN, ModelInfo, FaceClassifier]:
    """Threads, device, the model of ``--checkpoint`` and its :class:`FaceClassifier`."""
    set_threads(args.threads, log)
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
    return FaceDetector(args.min_face, args.scale_factor, args.min_neighbors)


class PhotoRun:
    """The pictures of one command run, with progress, counts and the closing line.

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
        self.started = time.perf_counter()
        self.counts = {"images": 0, "videos": 0, "frames": 0, "faces": 0, "faceless": 0}
        self.unreadable: list[tuple[str, str]] = []
        self._expected = {s.path: self._announced(s) for s in self.sources}
        self._seen: dict[Any, int] = {}
        self.bar = tqdm(
            total=sum(self._expected.values()),
            unit="picture",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (stderr_is_terminal() if progress is None else progress),
            leave=False,
        )

    def _announced(self, source: Source) -> int:
        if source.kind == "image":
            return 1
        frames = video_frame_count(source.path)
        return 1 if frames is None else max(1, math.ceil(frames / self.every))

    def log(self, message: str) -> None:
        """Print a message on stderr without breaking the bar."""
        self.bar.write(message, file=sys.stderr)

    def _skip(self, source: Source, reason: str) -> None:
        self.unreadable.append((str(source.path), reason))
        self.log(f"warning: skipped {source.path}: {reason}")

    def _done(self, source: Source) -> None:
        seen, expected = self._seen.pop(source.path, 0), self._expected[source.path]
        if source.kind == "video" and seen:
            self.counts["videos"] += 1
        if seen != expected:  # a video shorter or longer than its header says, or a file skipped
            self.bar.total += seen - expected
            self.bar.refresh()

    def pictures(self) -> Iterator[Picture]:
        """Every picture of the run, in order; unreadable files are reported and skipped."""
        by_name = {str(s.path): s for s in self.sources}
        self.bar.reset(total=self.bar.total)  # the clock starts now, not before the model was loaded
        for picture in iter_pictures(
            self.sources, every=self.every, on_unreadable=self._skip, on_source=self._done
        ):
            source = by_name[picture.source]
            self._seen[source.path] = self._seen.get(source.path, 0) + 1
            self.counts["frames" if picture.frame is not None else "images"] += 1
            self.bar.update(1)
            yield picture

    def face_groups(
        self, detector: FaceDetector | None, margin: float, batch_size: int
    ) -> Iterator[list[FacesInPicture]]:
        """The run's pictures with their faces, grouped for batches (see :func:`group_for_batches`).

        A group's faces are counted once the caller asks for the next group, i.e.
        after it has written the group's results.
        """
        for group in group_for_batches(find_faces(self.pictures(), detector, margin), batch_size):
            yield group
            for item in group:
                self.counts["faces"] += len(item.boxes)
                self.counts["faceless"] += not item.boxes

    @contextlib.contextmanager
    def interruptible(self, kept: str) -> Iterator[None]:
        """On Ctrl-C inside the block: close the bar, say what ``kept`` holds, re-raise."""
        try:
            yield
        except KeyboardInterrupt:
            self.bar.close()
            self.log(f"interrupted: {kept}")
            raise

    def finish(self, wrote: str) -> dict[str, Any]:
        """Close the bar, print the closing line and return the counts.

        Args:
            wrote: What the run wrote (``"stdout"``, a file, a folder), for the line.

        Raises:
            InputError: No input could be read at all.
        """
        self.bar.close()
        c = self.counts
        if not c["images"] and not c["frames"] and self.unreadable:
            path, reason = self.unreadable[0]
            raise InputError(
                f"none of the {len(self.unreadable)} files could be read ({path}: {reason})", subject="INPUT"
            )
        seconds = time.perf_counter() - self.started
        parts = [
            _count(c["images"], "image"),
            f"{_count(c['videos'], 'video')} ({_count(c['frames'], 'frame')})",
            _count(c["faces"], "face"),
            f"{_count(c['faceless'], 'picture')} without a face",
            f"{_count(len(self.unreadable), 'unreadable file')} skipped",
        ]
        print(f"{self.command}: {', '.join(parts)}; wrote {wrote} in {seconds:.1f} s", file=sys.stderr)
        return {**c, "unreadable": len(self.unreadable), "seconds": seconds}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
