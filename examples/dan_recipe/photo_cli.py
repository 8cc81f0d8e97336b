"""The command line that ``predict.py`` and ``explain.py`` share, and the bookkeeping of one run.

* :class:`CommandParser`: an ``argparse`` parser whose mistakes are one-line
  :class:`~dan_recipe.errors.UserError` s (status 1), like every other user error.
* :func:`photo_parser`, :func:`add_shared_flags`, :func:`check_shared_flags`: inputs, checkpoint, labels,
  face detection, batching, device and progress flags.
* :func:`open_model`, :func:`make_detector`: what those flags build.
* :class:`PhotoRun`: the pictures of a run with a progress bar (pictures read of
  those announced), counts of images, frames, faces and unreadable files, messages
  that do not break the bar, and the closing line.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from .checkpoints import ModelInfo
from .distributed import Dist
from .errors import UserError
from .face_pipeline import FacesInPicture, find_faces, group_for_batches
from .faces import DEFAULT_MARGIN, DEFAULT_MIN_FACE, FaceDetector
from .inference import FaceClassifier, load_checkpoint_for_inference
from .model import DAN
from .runtime import pick_device, set_threads_once, stderr_is_terminal
from .sources import Picture, Source, iter_pictures, video_frame_count

__all__ = [
    "CommandParser",
    "PhotoRun",
    "add_shared_flags",
    "check_shared_flags",
    "make_detector",
    "open_model",
    "photo_parser",
]


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that reports a bad command line as one ``error: ...`` line, status 1."""

    def error(self, message: str) -> NoReturn:
        """Raise the mistake as a :class:`~dan_recipe.errors.UserError`."""
        raise UserError(f"{message} (see {self.prog} --help)")


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
        UserError: A value out of range, naming the flag.
    """
    for flag, value, low in (
        ("--min-face", args.min_face, 1),
        ("--min-neighbors", args.min_neighbors, 0),
        ("--every", args.every, 1),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            raise UserError(f"{flag}: expected an int >= {low}, got {value}")
    if not args.margin >= 0:
        raise UserError(f"--margin: expected a number >= 0, got {args.margin}")
    if not args.scale_factor > 1:
        raise UserError(f"--scale-factor: expected a number > 1, got {args.scale_factor}")
    if args.threads not in (None, "auto") and not (str(args.threads).isdigit() and int(args.threads) >= 1):
        raise UserError(f"--threads: expected auto or an int >= 1, got {args.threads}")


def open_model(args: argparse.Namespace, log: Any) -> tuple[DAN, ModelInfo, FaceClassifier]:
    """Threads, device, the model of ``--checkpoint`` and its :class:`FaceClassifier`."""
    set_threads_once(args.threads, log)
    device = pick_device(args.device, Dist())
    model, info = load_checkpoint_for_inference(
        args.checkpoint, labels=args.labels, device=device, fast=args.fast, log=log
    )
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
            total=sum(self._expected.values()), unit="picture", file=sys.stderr, dynamic_ncols=True,
            disable=not (stderr_is_terminal() if progress is None else progress), leave=False,
        )  # fmt: skip

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
            UserError: No input could be read at all.
        """
        self.bar.close()
        c = self.counts
        if not c["images"] and not c["frames"] and self.unreadable:
            path, reason = self.unreadable[0]
            raise UserError(f"INPUT: none of the {len(self.unreadable)} files could be read ({path}: {reason})")
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
