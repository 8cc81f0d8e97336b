"""Folders the photo commands write pictures into (``predict.py --annotate``, ``explain.py --out``).

* :func:`prepare_output_folder` refuses a folder that already holds files unless
  ``--overwrite`` is given, so that no earlier result is replaced by surprise; with
  ``--overwrite``, files of the same names are replaced and other files are left
  alone.
* :class:`OutputNames` gives each picture (or face) of a run its own file name,
  made from the source's name, the frame and the face, with ``-2``, ``-3`` ...
  when two sources share a name (``a/img.jpg`` and ``b/img.jpg``).
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
    """Unique file names within one run.

    Example:
        >>> names = OutputNames()
        >>> names.name("photos/a b.jpg", None, None, ".jpg"), names.name("other/a b.jpg", None, None, ".jpg")
        ('a_b.jpg', 'a_b-2.jpg')
        >>> names.name("clip.mp4", 30, 1, ".png")
        'clip_f000030_face1.png'
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def name(self, source: str, frame: int | None, face: int | None, suffix: str) -> str:
        """A new name: ``<stem>[_f<frame>][_face<i>][-<n>]<suffix>``.

        Args:
            source: The input file's path.
            frame: Video frame index, or ``None``.
            face: Face index within the picture, or ``None``.
            suffix: File ending, with its dot.
        """
        stem = _UNSAFE.sub("_", Path(source).stem).strip("_") or "picture"
        if frame is not None:
            stem += f"_f{frame:06d}"
        if face is not None:
            stem += f"_face{face}"
        candidate, n = stem, 1
        while candidate.lower() in self._taken:
            n += 1
            candidate = f"{stem}-{n}"
        self._taken.add(candidate.lower())
        return candidate + suffix
