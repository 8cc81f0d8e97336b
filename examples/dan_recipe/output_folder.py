"""Folders the photo commands write pictures into (``predict.py --annotate``, ``explain.py --out``).

* :func:`prepare_output_folder` refuses a folder that already holds files unless
  ``--overwrite`` is given, so that no earlier result is replaced by surprise; with
  ``--overwrite``, files of the same names are replaced and other files are left
  alone.
* :class:`OutputNames` gives each picture (or face) of a run its own file name,
  made from the source's name, the frame and the face, with ``-2``, ``-3`` ...
  after the source's name when two sources share it (``a/img.jpg`` and
  ``b/img.jpg`` give ``img`` and ``img-2``).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

__all__ = ["OutputNames", "prepare_output_folder"]

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
        UserError: ``path`` is a file, cannot be created, or holds files and
            ``overwrite`` is false.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {path}: expected a folder, got a file")
    if folder.is_dir() and not overwrite:
        held = sum(1 for _ in folder.iterdir())
        if held:
            raise UserError(
                f"{flag} {path}: expected an empty or new folder, got one holding {held} entries; pass "
                "--overwrite to write into it (files of the same names are replaced), or another folder"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot create the folder ({exc.strerror})") from None
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
