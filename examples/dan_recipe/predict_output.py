"""What ``predict.py`` writes: one record per face, as JSON Lines or CSV, to stdout or a file.

A record (:class:`FaceRecord`) holds ``source`` (the file), ``frame`` (video frame
index, ``null`` for images), ``time_s`` (the frame's time in seconds, ``null`` for
images), ``face`` (index of the face in its picture, left to right), ``box``
(``[x, y, w, h]`` of the detector's box in the picture's pixels, without the crop
margin), ``label`` (the most probable class) and ``probabilities`` (``{class: p}``
in the model's class order, summing to 1). A picture without a face gets one
record whose ``face``, ``box``, ``label`` and ``probabilities`` are ``null``.

CSV has the columns ``source, frame, time_s, face, x, y, w, h, label`` and then
one column per class (its probability); empty cells stand for ``null``.

Files are never overwritten unless asked (:func:`open_records`): a file is written
under a temporary name beside the target and renamed onto it when the run ends,
also when it ends by Ctrl-C, so the target holds whole records only.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from .errors import UserError
from .faces import Box

__all__ = [
    "CSV_FIXED_COLUMNS",
    "OUTPUT_SUFFIXES",
    "FaceRecord",
    "RecordWriter",
    "check_output_file",
    "open_records",
]

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
            raise UserError(
                f"--out: expected class names that are not CSV column names ({', '.join(CSV_FIXED_COLUMNS)}), "
                f"got {', '.join(clash)}; pass --labels with other names or write JSON Lines"
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
        UserError: An unknown ending, a folder, a missing parent folder, or an
            existing file without ``--overwrite``.
    """
    if path is None or path == "-":
        return None
    target = Path(path)
    fmt = OUTPUT_SUFFIXES.get(target.suffix.lower())
    if fmt is None:
        raise UserError(f"--out {path}: expected a file ending in {', '.join(OUTPUT_SUFFIXES)}")
    if target.is_dir():
        raise UserError(f"--out {path}: expected a file, got a folder")
    if not target.parent.is_dir():
        raise UserError(f"--out {path}: expected a file in an existing folder, got no folder {target.parent}")
    if target.exists() and not overwrite:
        raise UserError(f"--out {path}: the file exists; pass --overwrite to replace it, or another --out")
    return fmt


@contextlib.contextmanager
def open_records(path: str | None, class_names: Sequence[str], *, overwrite: bool) -> Iterator[RecordWriter]:
    """A writer for ``--out`` (stdout when ``None`` or ``"-"``), JSON Lines or CSV by the file's ending.

    A file is written to a temporary name in its folder and renamed onto ``path``
    when the block ends normally or by Ctrl-C (the records written so far are
    kept); on any other error the temporary file is removed and ``path`` is left
    as it was. An existing ``path`` is replaced only with ``overwrite``.

    Raises:
        UserError: See :func:`check_output_file`.
    """
    fmt = check_output_file(path, overwrite)
    if path is None or path == "-":
        yield _JsonLinesWriter(sys.stdout)
        return
    target = Path(path)
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
